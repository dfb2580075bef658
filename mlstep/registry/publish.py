"""Publish a step: one MLflow run, one registered version per (key, variant), and what it came to.

::

    pub = publish(store, request)            # run + params/metrics + registrations; never raises for the store
    ... render report.json / report.md from the facts, the verdicts and pub.record(...) ...
    pub = finish(store, pub, report_files, evidence, gates_passed)   # the report becomes the run's evidence
    if pub.error: raise RegistryError(pub.message())                 # exit 2, outputs kept

The idempotency key of a variant is ``mlstep.key`` = sha256(source bytes sha256 : options hash), stored
with ``mlstep.variant`` as tags on the version, set in the same request that creates it. Registration of a
variant:

1. search the versions of the registered model with this key and variant; one exists -> ``existing``;
2. else save the flavor locally, hash it (``mlstep.sha256``), create a LoggedModel (PENDING -> READY) and
   the version (MLflow's client may retry that POST after a lost reply and create two);
3. search again and keep the lowest version with the key: every other one is removed by whoever created
   it (this run, or a run that is no longer RUNNING); a version of another live step is left to it.

So lost replies, client retries and N concurrent steps converge on exactly one version per (key, variant),
and re-runs register nothing. Store failures are never raised from :func:`publish`: the run is ended
FAILED, LoggedModels this run left PENDING are marked FAILED (when the store still answers), and
``Publication.error`` says what failed. A later run of the same key ends the runs a dead mlstep process left
RUNNING: on this host when the process is gone (FAILED), on another host when the run is older than
``MLSTEP_STALE_RUN_HOURS`` (KILLED); see :func:`_reap`.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlstep import __version__
from mlstep.errors import BadInputError, MlstepError, RegistryError
from mlstep.redact import scrub, scrub_all
from mlstep.registry.sources import TAG_MLSTEP_RUN, TAG_SOURCE, TAG_VARIANT, Resolved
from mlstep.registry.store import Store, filter_string, is_unreachable

DEFAULT_EXPERIMENT = "mlstep"
DEFAULT_ALIASES = {"fp32": "optimized-fp32", "fp16": "optimized-fp16"}
TAG_OPTIONS_HASH = "mlstep.options_hash"
TAG_SOURCE_SHA256 = "mlstep.source_sha256"
TAG_KEY = "mlstep.key"
TAG_SHA256 = "mlstep.sha256"               # the registered model's own files (see model_digest)
TAG_GATES = "mlstep.gates"
TAG_HOST, TAG_PID = "mlstep.host", "mlstep.pid"
TAG_ENDED_BY = "mlstep.ended_by"           # on a stale run another step ended
ENV_STALE_HOURS = "MLSTEP_STALE_RUN_HOURS"
TAG_NOTE = "mlflow.note.content"          # the run's description in MLflow's UI: report.md
NOTE_LIMIT = 8000                          # MLflow's limit for a tag value
TAG_OPTIMIZED = "mlstep.optimized"         # on a source: mlstep.optimized.<variant> = models:/NAME/VERSION
METADATA_FILES = frozenset({"MLmodel", "conda.yaml", "python_env.yaml", "requirements.txt", "registered_model_meta",
                            "input_example.json", "serving_input_example.json"})


def idempotency_key(source_sha256: str, options_hash: str) -> str:
    return hashlib.sha256(f"{source_sha256}:{options_hash}".encode()).hexdigest()


def model_digest(folder: Path) -> str:
    """sha256 of an MLflow model folder's model files (names and bytes; MLmodel and env files excluded)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in METADATA_FILES):
        digest.update(path.relative_to(folder).as_posix().encode("utf-8") + b"\0")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------- types

@dataclass(frozen=True)
class VariantToPublish:
    path: Path                      # the variant's .onnx file (external data beside it)
    passed: bool                    # every gate passed for this variant (only those are registered)
    description: str = ""
    metrics: Mapping[str, float] = field(default_factory=dict)    # plain keys, logged on its LoggedModel only


@dataclass(frozen=True)
class PublishRequest:
    resolved: Resolved
    register_as: str | None         # None: log the run only
    options_hash: str
    variants: Mapping[str, VariantToPublish]
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    aliases: Mapping[str, str] = field(default_factory=dict)      # variant -> alias ("" or missing: none)
    experiment: str | None = None   # default: MLFLOW_EXPERIMENT_NAME, else "mlstep"
    tags: Mapping[str, str] = field(default_factory=dict)         # more run tags (e.g. mlstep.model_type)

    @property
    def key(self) -> str:
        if not self.resolved.sha256:
            raise ValueError("a source to publish must be hashed (materialize(..., identify_local=True))")
        return idempotency_key(self.resolved.sha256, self.options_hash)


@dataclass
class Registration:
    """What the registration of one variant came to."""

    variant: str
    status: str                     # registered | existing | skipped (gate failed) | failed | pending
    uri: str | None = None          # models:/NAME/VERSION
    version: str | None = None
    alias: str | None = None
    sha256: str | None = None       # model_digest of the registered version's files
    error: str | None = None


@dataclass
class Publication:
    """The run and the registrations of one step (``error``: what failed, None when nothing did)."""

    run_id: str | None = None
    experiment_id: str | None = None
    key: str | None = None
    registered_model: str | None = None
    registrations: dict[str, Registration] = field(default_factory=dict)
    run_status: str | None = None   # FINISHED | FAILED | RUNNING (the store stopped answering before it ended)
    removed: list[str] = field(default_factory=list)         # duplicate versions removed (models:/N/V)
    reaped: list[str] = field(default_factory=list)          # runs of dead steps ended (FAILED / KILLED)
    error: str | None = None
    _logged: list[str] = field(default_factory=list, repr=False)   # LoggedModels this run created

    @property
    def unreachable(self) -> bool:
        return self.error is not None and "did not answer" in self.error

    def message(self) -> str:
        """One line for a ``RegistryError``: what failed and what exists."""
        done = [f"{r.variant} {r.uri}" for r in self.registrations.values() if r.uri]
        left = " (its run is left RUNNING: the store did not answer)" if self.run_status == "RUNNING" else ""
        return (f"{self.error} (registered so far: {', '.join(done) or 'nothing'}{left}; "
                "a re-run completes the registration without duplicates)")

    def record(self, store: Store, resolved: Resolved, register_as: str | None) -> dict:
        """The report's ``mlflow`` section."""
        return record(store, resolved, register_as, self)


def record(store: Store, resolved: Resolved, register_as: str | None, pub: Publication | None = None) -> dict:
    """The report's ``mlflow`` section (before publishing: ``pub`` None)."""
    pub = pub or Publication()
    return scrub_all({
        "tracking_uri": store.shown, "source": resolved.as_dict(), "experiment_id": pub.experiment_id,
        "run_id": pub.run_id, "run_status": pub.run_status, "key": pub.key, "registered_model": register_as,
        "registrations": {v: {"status": r.status, "uri": r.uri, "alias": r.alias, "sha256": r.sha256}
                          for v, r in pub.registrations.items()},
        "removed_duplicates": list(pub.removed), "ended_stale_runs": list(pub.reaped), "error": pub.error})


# --------------------------------------------------------------------------------------------- publish

def publish(store: Store, request: PublishRequest) -> Publication:
    """Log the run and register the gate-passed variants; see the module docstring. Never raises
    ``MlstepError`` for the store: ``Publication.error`` says what failed."""
    stale_run_hours()                  # a malformed MLSTEP_STALE_RUN_HOURS fails before any request
    pub = Publication(key=request.key, registered_model=request.register_as)
    if request.register_as:
        pub.registrations = {v: Registration(v, "pending" if s.passed else "skipped",
                                             alias=request.aliases.get(v) or None)
                             for v, s in request.variants.items()}
    try:
        pub.experiment_id = _experiment(store, request.experiment)
        run = store.call("start run", store.client.create_run, pub.experiment_id, run_name=_run_name(request),
                         tags=_run_tags(request, pub.key))
        pub.run_id, pub.run_status = run.info.run_id, "RUNNING"
        _end_duplicate_runs(store, pub)
        _reap(store, pub)
        store.call("log params", store.client.log_batch, pub.run_id, params=_params(request.params),
                   metrics=_metrics(request.metrics))
        _log_source_input(store, pub, request.resolved)
        if request.register_as:
            _ensure_registered_model(store, request.register_as)
            for variant, reg in pub.registrations.items():
                if reg.status == "pending":
                    _register(store, pub, request, variant, reg)
            _tag_source(store, request.resolved, pub)
    except MlstepError as err:
        pub.error = str(err)
        for reg in pub.registrations.values():
            if reg.status == "pending":
                reg.status, reg.error = "failed", pub.error
    except BaseException:              # a bug or a signal: the run still ends FAILED, then it propagates
        with contextlib.suppress(Exception):
            _end(store, pub, "FAILED")
        raise
    _end(store, pub, "FAILED" if pub.error else "FINISHED")
    return pub


def finish(store: Store, pub: Publication, files: Sequence[Path], evidence: Mapping[Path, str | None] | None = None,
           gates_passed: bool | None = None) -> Publication:
    """Log the rendered report (``files``) and ``evidence`` (path -> artifact folder) with the run, tag
    ``mlstep.gates``; the report is also given to the runs of ``existing`` versions that hold none (a step
    cut off before its report), so ``promote`` finds its evidence. A failure here sets ``pub.error`` and
    ends the run FAILED. A store that stopped answering is not asked again (each call would wait out its
    retries)."""
    if pub.run_id is None or pub.unreachable:
        return pub
    try:
        for path in files:
            store.call(f"log {path.name}", store.client.log_artifact, pub.run_id, str(path))
        for path, folder in (evidence or {}).items():
            store.call(f"log {path.name}", store.client.log_artifact, pub.run_id, str(path), folder)
        if gates_passed is not None:
            store.call("log tags", store.client.set_tag, pub.run_id, TAG_GATES, "passed" if gates_passed else "failed")
        note = next((p for p in files if p.suffix == ".md"), None)
        if note is not None:
            store.call("log the run description", store.client.set_tag, pub.run_id, TAG_NOTE, description(note))
        for run_id in _runs_without_report(store, pub):
            for path in files:
                store.call(f"log {path.name}", store.client.log_artifact, run_id, str(path))
    except MlstepError as err:
        pub.error = pub.error or str(err)
        _end(store, pub, "FAILED")
    return pub


def description(report_md: Path) -> str:
    """report.md as the run's description (cut at MLflow's tag limit, pointing at the full artifact)."""
    text = scrub(report_md.read_text(encoding="utf-8"))
    if len(text) <= NOTE_LIMIT:
        return text
    tail = f"\n\n... (cut; the full report is the run's artifact {report_md.name})\n"
    return text[: NOTE_LIMIT - len(tail)].rsplit("\n", 1)[0] + tail


# ----------------------------------------------------------------------------------------- registering

def _register(store: Store, pub: Publication, request: PublishRequest, variant: str, reg: Registration) -> None:
    name = request.register_as
    client = store.client
    tags = {TAG_VARIANT: variant, TAG_SOURCE: scrub(request.resolved.uri), TAG_SOURCE_SHA256: request.resolved.sha256,
            TAG_OPTIONS_HASH: request.options_hash, TAG_KEY: pub.key, TAG_GATES: "passed"}
    found = _with_key(store, name, pub.key, variant)
    if not found:
        with tempfile.TemporaryDirectory(prefix="mlstep-flavor-") as tmp:
            folder = _save_flavor(request.variants[variant].path, Path(tmp) / variant)
            tags[TAG_SHA256] = model_digest(folder)
            model_id = _log_model(store, pub, request, variant, folder, tags)
        failure = None
        try:
            store.call(f"register {variant} as {name}", client.create_model_version, name, f"models:/{model_id}",
                       run_id=pub.run_id, tags=tags, model_id=model_id,
                       description=scrub(request.variants[variant].description), await_creation_for=0)
        except RegistryError as err:      # the reply may be lost while the version exists: look before failing
            failure = err
        try:
            found = _with_key(store, name, pub.key, variant)
        except MlstepError:
            if failure is not None:
                raise failure from None
            raise
        if not found:
            raise failure or RegistryError(f"register {variant} as {name}: the version is missing after its "
                                           f"creation (MLflow at {store.shown})")
    # Converge (also on a re-run: a duplicate whose creator died before converging is removed here).
    keep = min(found, key=lambda v: int(v.version))
    for extra in found:
        if extra is not keep and _may_remove(store, pub, extra):
            with contextlib.suppress(BadInputError):          # removed meanwhile by another step
                store.call(f"remove duplicate models:/{name}/{extra.version}", client.delete_model_version, name,
                           extra.version)
                pub.removed.append(f"models:/{name}/{extra.version}")
    reg.status = "registered" if keep.run_id == pub.run_id else "existing"
    reg.version, reg.uri = str(keep.version), f"models:/{name}/{keep.version}"
    reg.sha256 = (keep.tags or {}).get(TAG_SHA256)
    if reg.alias:
        store.set_alias(name, reg.alias, reg.version)


def _with_key(store: Store, name: str, key: str, variant: str) -> list:
    query = filter_string(name=name, tags={TAG_KEY: key, TAG_VARIANT: variant})
    found = store.call(f"models:/{name}: search", store.client.search_model_versions, query)
    return [v for v in found if str(getattr(v, "status", "READY")) != "FAILED_REGISTRATION"]


def _may_remove(store: Store, pub: Publication, version) -> bool:
    """A duplicate is removed by its creator: this run, or a run that will not converge any more."""
    if version.run_id == pub.run_id or version.run_id in pub.reaped:
        return True
    if not version.run_id:
        return False
    run = store.call(f"run {version.run_id}", store.client.get_run, version.run_id)
    return run.info.status != "RUNNING"


def _save_flavor(path: Path, folder: Path) -> Path:
    """The ONNX flavor of the variant, with its tensor signature and an input example (batch 2, sequence 8,
    synthesized from the graph's inputs the way parity does)."""
    import mlflow.onnx
    import onnx

    model = onnx.load(str(path))           # external data included: the flavor writes its own copy
    mlflow.onnx.save_model(model, str(folder), pip_requirements=_requirements(), signature=_signature(model),
                           input_example=input_example(path))
    return folder


def input_example(path: Path) -> dict | None:
    """Feeds for the model at ``path`` (its declared dtypes), from the graph's inputs; None when the inputs
    cannot be synthesized (a model without an example is still a model)."""
    import numpy as np
    import onnx_ir as ir

    from mlstep.validate.inputs import synthesize_inputs

    try:
        model = ir.load(str(path))
        cases = synthesize_inputs(model, batch=2, sequence=8)
    except Exception:  # noqa: BLE001  (exotic inputs: no example)
        return None
    if not cases:
        return None
    declared = {v.name: v.dtype for v in model.graph.inputs}
    feeds = {}
    for name, value in cases[-1].feeds.items():
        dtype = declared.get(name)
        np_dtype = dtype.numpy() if dtype is not None else None
        feeds[name] = np.asarray(value).astype(np_dtype) if np_dtype is not None else np.asarray(value)
    return feeds


def _log_model(store: Store, pub: Publication, request: PublishRequest, variant: str, folder: Path,
               tags: Mapping[str, str]) -> str:
    """A LoggedModel of this run holding ``folder``: PENDING while it uploads, READY after. It carries the
    run's source tags and options, and only its own variant's figures as metrics (plain keys, logged at the
    step of its model output, as MLflow links a run's metrics to the model logged at that step)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric

    client = store.client
    step = list(request.variants).index(variant)
    logged = store.call(f"log {variant} model", client.create_logged_model, pub.experiment_id, name=variant,
                        source_run_id=pub.run_id, tags={**tags, **source_tags()}, params=dict(_params_dict(request)),
                        model_type="onnx")
    pub._logged.append(logged.model_id)
    store.call(f"log {variant} model", client.log_outputs, pub.run_id, [LoggedModelOutput(logged.model_id, step)])
    now = int(time.time() * 1000)
    metrics = [Metric(k, float(v), now, step, model_id=logged.model_id)
               for k, v in request.variants[variant].metrics.items()]
    if metrics:
        store.call(f"log {variant} metrics", client.log_batch, pub.run_id, metrics=metrics)
    store.call(f"log {variant} model", client.log_model_artifacts, logged.model_id, str(folder))
    store.call(f"log {variant} model", client.finalize_logged_model, logged.model_id, LoggedModelStatus.READY)
    return logged.model_id


def _log_source_input(store: Store, pub: Publication, resolved: Resolved) -> None:
    """The source as the run's input (MLflow 3 lineage): the LoggedModel the source is, when it is one."""
    from mlflow.entities import LoggedModelInput

    if resolved.model_id:
        store.call("log the source as the run's input", store.client.log_inputs, pub.run_id,
                   models=[LoggedModelInput(resolved.model_id)])


def _tag_source(store: Store, resolved: Resolved, pub: Publication) -> None:
    """Point the source at its variants: ``mlstep.optimized.<variant>`` = ``models:/NAME/VERSION`` on the source
    version (and on the source LoggedModel)."""
    tags = {f"{TAG_OPTIMIZED}.{r.variant}": r.uri for r in pub.registrations.values() if r.uri}
    if not tags:
        return
    if resolved.kind == "model_version" and resolved.name and resolved.version:
        for key, value in tags.items():
            store.call(f"tag {resolved.uri}", store.client.set_model_version_tag, resolved.name, resolved.version,
                       key, value)
    if resolved.model_id:
        store.call(f"tag models:/{resolved.model_id}", store.client.set_logged_model_tags, resolved.model_id, tags)


def _ensure_registered_model(store: Store, name: str) -> None:
    try:
        store.client.create_registered_model(name, description="Registered by mlstep.")
    except Exception as err:
        if getattr(err, "error_code", None) not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise store.translate(err, f"models:/{name}") from err


# -------------------------------------------------------------------------------------------- the run

def _experiment(store: Store, experiment: str | None) -> str:
    name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
    exp = store.call(f"experiment {name}", store.client.get_experiment_by_name, name)
    if exp is not None:
        return exp.experiment_id
    try:
        return store.client.create_experiment(name)
    except Exception as err:  # created meanwhile by a concurrent step
        exp = store.call(f"experiment {name}", store.client.get_experiment_by_name, name)
        if exp is None:
            raise store.translate(err, f"experiment {name}") from err
        return exp.experiment_id


def _end(store: Store, pub: Publication, status: str) -> None:
    """End the run and fail this run's PENDING LoggedModels; best effort (the store may be gone)."""
    if pub.run_id is None:
        return
    if pub.unreachable:
        pub.run_status = "RUNNING"     # asking again would only wait out the retries; a later run reaps it
        return
    try:
        _fail_pending(store, pub._logged + _orphans(store, pub))
        store.call("end run", store.client.set_terminated, pub.run_id, status)
        pub.run_status = status
    except MlstepError as err:
        pub.error = pub.error or str(err)
        pub.run_status = "RUNNING" if is_unreachable(err) else pub.run_status


def _fail_pending(store: Store, model_ids: Sequence[str]) -> None:
    from mlflow.entities import LoggedModelStatus

    for model_id in model_ids:
        logged = store.call(f"models:/{model_id}", store.client.get_logged_model, model_id)
        if str(logged.status) in ("PENDING", "LoggedModelStatus.PENDING") or logged.status == LoggedModelStatus.PENDING:
            store.call(f"models:/{model_id}", store.client.finalize_logged_model, model_id, LoggedModelStatus.FAILED)


def _orphans(store: Store, pub: Publication) -> list[str]:
    """LoggedModels of this run that a retried create made twice (the first reply lost): never uploaded."""
    query = filter_string(tags={TAG_KEY: pub.key})
    found = store.call("search models", store.client.search_logged_models, [pub.experiment_id], query)
    return [m.model_id for m in found if m.source_run_id == pub.run_id and m.model_id not in pub._logged]


def _end_duplicate_runs(store: Store, pub: Publication) -> None:
    """Runs of this very process other than its own: made by a retried create-run whose reply was lost."""
    query = filter_string(tags={TAG_KEY: pub.key, TAG_PID: str(os.getpid())}) + " and attributes.status = 'RUNNING'"
    for run in store.call("search runs", store.client.search_runs, [pub.experiment_id], query):
        if run.info.run_id != pub.run_id and (run.data.tags or {}).get(TAG_HOST) == socket.gethostname():
            store.call("end run", store.client.set_terminated, run.info.run_id, "FAILED")
            pub.reaped.append(run.info.run_id)


def _reap(store: Store, pub: Publication) -> None:
    """End the runs of this key that a dead mlstep process left RUNNING.

    - on this host, a process that no longer exists: FAILED;
    - on another host (whose processes cannot be asked), a run started more than ``MLSTEP_STALE_RUN_HOURS``
      (default 24) ago: KILLED, with ``mlstep.ended_by`` saying which run ended it and why. A younger run of
      another host is a live concurrent step: it is left to converge by itself.
    """
    query = filter_string(tags={TAG_KEY: pub.key}) + " and attributes.status = 'RUNNING'"
    runs = store.call("search runs", store.client.search_runs, [pub.experiment_id], query)
    host = socket.gethostname()
    stale_before = int(time.time() * 1000) - int(stale_run_hours() * 3600 * 1000)
    for run in runs:
        tags = run.data.tags or {}
        if run.info.run_id == pub.run_id or run.info.run_id in pub.reaped:
            continue
        local = tags.get(TAG_HOST) == host and tags.get(TAG_PID, "").isdigit()
        if local and _alive(int(tags[TAG_PID])):
            continue
        if not local and (run.info.start_time or 0) > stale_before:
            continue
        models = [o.model_id for o in (run.outputs.model_outputs if run.outputs else [])]
        _fail_pending(store, models)
        if local:
            why = f"its mlstep process {tags[TAG_PID]} on {host} is gone"
        else:
            started = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime((run.info.start_time or 0) / 1000))
            why = (f"left RUNNING by host {tags.get(TAG_HOST, '?')} since {started}, more than "
                   f"{stale_run_hours():g} h ({ENV_STALE_HOURS})")
        store.call("end run", store.client.set_tag, run.info.run_id, TAG_ENDED_BY,
                   scrub(f"ended by mlstep run {pub.run_id}: {why}"))
        store.call("end run", store.client.set_terminated, run.info.run_id, "FAILED" if local else "KILLED")
        pub.reaped.append(run.info.run_id)


def stale_run_hours() -> float:
    value = os.environ.get(ENV_STALE_HOURS, "").strip() or "24"
    try:
        hours = float(value)
    except ValueError:
        hours = -1.0
    if not hours >= 0:
        raise BadInputError(f"{ENV_STALE_HOURS}={value!r}: expected a number of hours >= 0")
    return hours


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _runs_without_report(store: Store, pub: Publication) -> list[str]:
    out: list[str] = []
    for reg in pub.registrations.values():
        if reg.status != "existing" or not reg.version:
            continue
        version = store.call(reg.uri, store.client.get_model_version, pub.registered_model, reg.version)
        if version.run_id and version.run_id != pub.run_id and version.run_id not in out:
            names = {a.path for a in store.call(f"run {version.run_id}", store.client.list_artifacts, version.run_id)}
            if "report.json" not in names:
                out.append(version.run_id)
    return out


def _run_name(request: PublishRequest) -> str:
    resolved = request.resolved
    label = resolved.name or resolved.local_path.stem
    return scrub(f"mlstep-{label}" + (f"-v{resolved.version}" if resolved.version else ""))[:250]


def _run_tags(request: PublishRequest, key: str) -> dict[str, str]:
    resolved = request.resolved
    tags = {TAG_SOURCE: resolved.uri, "mlstep.source_requested": resolved.requested, TAG_KEY: key,
            TAG_SOURCE_SHA256: resolved.sha256, TAG_OPTIONS_HASH: request.options_hash, TAG_MLSTEP_RUN: __version__,
            TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid())}
    tags.update(source_tags())
    if resolved.alias:
        tags["mlstep.source_alias"] = resolved.alias
    tags.update(request.tags)
    tags.update(ci_tags())
    return {k: scrub(str(v))[:5000] for k, v in tags.items()}


def _params(params: Mapping[str, Any]) -> list:
    from mlflow.entities import Param

    return [Param(k, v) for k, v in _params_dict(params).items()]


def _params_dict(params: "Mapping[str, Any] | PublishRequest") -> dict[str, str]:
    params = params.params if isinstance(params, PublishRequest) else params
    return {k: scrub(str(v))[:6000] for k, v in sorted(params.items())}


def _metrics(metrics: Mapping[str, float]) -> list:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, float(v), now, 0) for k, v in metrics.items()]


def source_tags(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """MLflow's own ``mlflow.source.*`` tags, the same on the run and on each LoggedModel it makes: a JOB named
    by the GitHub Actions run URL in Actions, else by the mlstep command."""
    env = os.environ if env is None else env
    tags = {"mlflow.source.type": "JOB", "mlflow.source.name": ci_tags(env).get("github.run_url") or "mlstep"}
    if env.get("GITHUB_SHA"):
        tags["mlflow.source.git.commit"] = scrub(env["GITHUB_SHA"])
    return tags


def ci_tags(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The GitHub Actions context, when present."""
    from mlstep.registry.store import shown_uri

    env = os.environ if env is None else env
    tags = {}
    for var, tag in (("GITHUB_REPOSITORY", "github.repository"), ("GITHUB_RUN_ID", "github.run_id"),
                     ("GITHUB_RUN_ATTEMPT", "github.run_attempt"), ("GITHUB_SHA", "github.sha"),
                     ("GITHUB_REF", "github.ref"), ("GITHUB_WORKFLOW", "github.workflow"),
                     ("GITHUB_JOB", "github.job"), ("GITHUB_ACTOR", "github.actor")):
        if env.get(var):
            tags[tag] = scrub(env[var])
    if env.get("GITHUB_REPOSITORY") and env.get("GITHUB_RUN_ID"):
        server = shown_uri(env.get("GITHUB_SERVER_URL") or "https://github.com").rstrip("/")
        tags["github.run_url"] = f"{server}/{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"
    return tags


def _requirements() -> list[str]:
    """Pinned explicitly: MLflow's inference would load the model in a subprocess just to guess these."""
    import onnx

    reqs = [f"onnx=={onnx.__version__}"]
    with contextlib.suppress(ImportError):
        import onnxruntime

        reqs.append(f"onnxruntime>={onnxruntime.__version__.split('+')[0]}")
    return reqs


def _signature(model):
    """Tensor signature from the graph's inputs and outputs (symbolic dims become -1)."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec
    from onnx import helper

    def spec(value):
        tensor = value.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
        return TensorSpec(np.dtype(helper.tensor_dtype_to_np_dtype(tensor.elem_type)), dims, value.name)

    try:
        return ModelSignature(Schema([spec(v) for v in model.graph.input]), Schema([spec(v) for v in model.graph.output]))
    except Exception:  # an exotic type: a model without a signature is still a model
        return None


# ------------------------------------------------------------------------------- from today's report dict

def request_from_report(report: Mapping, resolved: Resolved, variant_paths: Mapping[str, Path], *,
                        register_as: str | None, aliases: Mapping[str, str], experiment: str | None) -> PublishRequest:
    """A :class:`PublishRequest` from a report dict (``options``, ``variants.*.gate.passed``, figures)."""
    variants = {name: VariantToPublish(Path(variant_paths[name]), bool(facts["gate"]["passed"]),
                                       describe(name, report, resolved), variant_metrics(report, name))
                for name, facts in report["variants"].items()}
    return PublishRequest(resolved=resolved, register_as=register_as, options_hash=report["options"]["options_hash"],
                          variants=variants, params=params_of(report, resolved), metrics=metric_values(report),
                          aliases=dict(aliases), experiment=experiment,
                          tags={"mlstep.model_type": str(report["model_type"])})


def _flat(value: Any) -> str:
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(map(str, value))
    return str(value)


def params_of(report: Mapping, resolved: Resolved) -> dict[str, str]:
    """Every optimizer and step option, the detected model facts and the source resolution."""
    params = {k: _flat(v) for k, v in report["options"].items()}
    params.update({"detected_model_type": report["model_type"], "detected_num_heads": report["num_heads"],
                   "detected_hidden_size": report["hidden_size"]})
    params.update({f"source_{k}": v for k, v in (("uri", resolved.uri), ("alias", resolved.alias),
                                                 ("version", resolved.version), ("sha256", resolved.sha256))
                   if v is not None})
    return {k: scrub(str(v)) for k, v in params.items()}


def metric_values(report: Mapping) -> dict[str, float]:
    """The run's metrics: optimizer time, the source's latency and every variant's figures prefixed by the
    variant (``fp32.parity.max_abs_diff``): the run holds both variants, so its keys say which."""
    out: dict[str, float] = {"optimizer_seconds": report["optimizer_seconds"]}
    baseline = None
    for name, v in report["variants"].items():
        out.update({f"{name}.{key}": value for key, value in variant_metrics(report, name).items()})
        baseline = baseline or v["latency_ms"]["baseline_median"]
    if baseline is not None:
        out["baseline.latency_ms.median"] = baseline
    return {k: float(val) for k, val in out.items() if val is not None}


def variant_metrics(report: Mapping, name: str) -> dict[str, float]:
    """One variant's figures with plain keys (``parity.max_abs_diff``, ``latency_ms.median``, ``speedup``,
    ``fusions.<op>``, ``gate.passed``): what its LoggedModel carries."""
    v = report["variants"][name]
    out: dict[str, float] = {f"fusions.{op}": count for op, count in v["fusions"].items()}
    out["fusions.total"] = sum(v["fusions"].values())
    if v["parity"]["max_abs_diff"] is not None:
        out["parity.max_abs_diff"] = v["parity"]["max_abs_diff"]
    for key in ("median", "p90", "p95"):
        if v["latency_ms"][key] is not None:
            out[f"latency_ms.{key}"] = v["latency_ms"][key]
    if v["latency_ms"]["speedup"] is not None:
        out["speedup"] = v["latency_ms"]["speedup"]
    if v["latency_ms"].get("baseline_median") is not None:
        out["baseline.latency_ms.median"] = v["latency_ms"]["baseline_median"]
    out["gate.passed"] = 1.0 if v["gate"]["passed"] else 0.0
    return {k: float(val) for k, val in out.items() if val is not None}


def describe(variant: str, report: Mapping, resolved: Resolved) -> str:
    v = report["variants"][variant]
    fused = ", ".join(f"{op} x{n}" for op, n in v["fusions"].items()) or "no fusions"
    parts = [f"mlstep {__version__}: {variant} variant of {resolved.uri}", f"fused: {fused}"]
    if v["parity"]["max_abs_diff"] is not None:
        parts.append(f"parity max |diff| {v['parity']['max_abs_diff']:.2e}")
    if v["latency_ms"]["speedup"] is not None:
        parts.append(f"speedup {v['latency_ms']['speedup']:.2f}x")
    return scrub("; ".join(parts))
