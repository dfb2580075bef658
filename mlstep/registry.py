"""MLflow: resolve and download sources, log the step's run, register gate-passed variants, move aliases.

This is the only module that imports mlflow (lazily: a purely local ``mlstep optimize model.onnx`` never
loads it). Everything MLflow raises is turned into one of mlstep's typed errors here, with a one-line,
credential-free message.

Sources (:func:`materialize`)::

    runs:/RUN_ID/PATH          an artifact (an MLflow model folder or a .onnx file) of a run
    models:/NAME/VERSION       a registered model version
    models:/NAME@ALIAS         resolved to its version first (the alias may move while the step runs)
    models:/NAME/latest        the highest version number
    models:/m-ID               an MLflow 3 LoggedModel
    DIR | DIR/MLmodel          a local MLflow model folder (onnx flavor, or exactly one .onnx inside)
    FILE.onnx                  a local file

Each resolves to a :class:`Resolved` (concrete URI, registered name/version, run id, LoggedModel id and
the local .onnx path). Downloads go to a temporary folder that lives until the ``with`` block ends: the
optimizer keeps weights lazy (memory-mapped) and reads them only when it saves the variants.

Store: ``MLFLOW_TRACKING_URI`` (``MLFLOW_REGISTRY_URI`` for the registry when set; credentials through
the usual ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN`` variables or ``user:pass@`` in the URI).
Unset, the embedded default is MLflow 3's own: ``sqlite:///<cwd>/mlflow.db`` with artifacts in
``<cwd>/mlruns`` (``mlflow ui`` started in that folder shows it).

Retries: every HTTP request is retried by MLflow's client (connection errors, 429/5xx) with exponential
backoff; mlstep bounds it: ``MLSTEP_REGISTRY_RETRIES`` (default 5), ``MLSTEP_REGISTRY_BACKOFF`` (whole seconds,
default 1: waits of about 0, 2, 4, 8, 16 s, plus up to 1 s of jitter) and ``MLSTEP_REGISTRY_TIMEOUT``
(whole seconds per request, default 30): about half a minute before a dead server is reported. Set, they override MLflow's ``MLFLOW_HTTP_REQUEST_*`` variables; unset, those are honoured
and only missing ones get mlstep's defaults. When they are spent: one line, exit 2 (``RegistryError``).

Idempotency key of a registered variant: (registered model name, ``mlstep.source`` = the concrete source
URI, ``mlstep.options_hash`` = ``OptimizeOptions.hash()``, ``mlstep.variant``) among versions tagged
``mlstep.gates = passed``. A version is created together with its tags in one request
(``MlflowClient.create_model_version(..., tags=...)``), so a version either carries its key or does not exist: a
re-run after a half-way failure finds what exists and registers only what is missing.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mlstep import __version__
from mlstep.errors import BadInputError, GateFailedError, MlstepError, RegistryError, UsageError
from mlstep.report import scrub

MLFLOW_SCHEMES = ("runs:/", "models:/")
DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlruns"
DEFAULT_EXPERIMENT = "mlstep"
DEFAULT_ALIASES = {"fp32": "optimized-fp32", "fp16": "optimized-fp16"}

TAG_VARIANT = "mlstep.variant"
TAG_SOURCE = "mlstep.source"
TAG_OPTIONS_HASH = "mlstep.options_hash"
TAG_GATES = "mlstep.gates"

ENV_RETRIES, ENV_BACKOFF, ENV_TIMEOUT = "MLSTEP_REGISTRY_RETRIES", "MLSTEP_REGISTRY_BACKOFF", "MLSTEP_REGISTRY_TIMEOUT"
RETRY_DEFAULTS = {ENV_RETRIES: ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5"),
                  ENV_BACKOFF: ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                  ENV_TIMEOUT: ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")}

_ALIAS = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_RESERVED_ALIAS = re.compile(r"^(latest|v\d+)$", re.IGNORECASE)
_RUN_ID = re.compile(r"^[0-9A-Za-z_-]+$")


def is_mlflow_uri(source: str | os.PathLike) -> bool:
    return os.fspath(source).startswith(MLFLOW_SCHEMES)


def check_alias(alias: str) -> str:
    """An alias MLflow accepts (letters, digits, ``-``, ``_``; not ``latest`` nor ``v<N>``)."""
    if not _ALIAS.match(alias) or _RESERVED_ALIAS.match(alias):
        raise UsageError(f"invalid alias {alias!r} (letters, digits, '-' and '_'; not 'latest' or 'v<number>')")
    return alias


# ----------------------------------------------------------------------------------------- resolution

def parse_uri(uri: str) -> tuple[str, str, str | None]:
    """Check an MLflow URI's shape (no store needed): ``(kind, first, second)``.

    ``("run", RUN_ID, PATH)``, ``("logged_model", "m-ID", None)``, ``("alias", NAME, ALIAS)``,
    ``("version", NAME, VERSION | "latest")``. ``BadInputError`` for anything else.
    """
    shown = scrub(uri)
    if uri.startswith("runs:/"):
        run_id, _, path = uri[len("runs:/"):].partition("/")
        path = path.strip("/")
        if not run_id or not _RUN_ID.match(run_id) or not path:
            raise BadInputError(f"{shown}: expected runs:/RUN_ID/PATH")
        return "run", run_id, path
    if not uri.startswith("models:/"):
        raise BadInputError(f"{shown}: not an MLflow URI (runs:/... or models:/...)")
    rest = uri[len("models:/"):]
    if rest.startswith("m-") and "/" not in rest and "@" not in rest and len(rest) > 2:
        return "logged_model", rest, None
    if "@" in rest:
        name, alias = rest.rsplit("@", 1)
        if not name or not alias or "/" in alias:
            raise BadInputError(f"{shown}: expected models:/NAME@ALIAS")
        return "alias", name, alias
    name, _, number = rest.rpartition("/")
    if not name or not number:
        raise BadInputError(f"{shown}: expected models:/NAME/VERSION, models:/NAME@ALIAS or models:/m-ID")
    if number.lower() == "latest":
        return "version", name, "latest"
    if not number.isdigit():
        raise BadInputError(f"{shown}: version {number!r} is not a number (stages are not supported: "
                            "use models:/NAME@ALIAS)")
    return "version", name, number


@dataclass(frozen=True)
class Resolved:
    """What a source resolved to, recorded before any work (``uri`` is concrete: no alias)."""

    requested: str                      # as given (credentials scrubbed)
    uri: str                            # models:/NAME/VERSION | runs:/RUN/PATH | models:/m-ID | file:///abs#sha256=
    kind: str                           # model_version | run | logged_model | local
    local_path: Path                    # the .onnx file to optimize
    name: str | None = None             # registered model name (default registration target)
    version: str | None = None
    alias: str | None = None
    run_id: str | None = None
    model_id: str | None = None

    @property
    def from_mlflow(self) -> bool:
        return self.kind != "local"

    def describe(self) -> str:
        if self.uri == self.requested or self.kind == "local":
            return self.requested
        return f"{self.requested} -> {self.uri}"

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("local_path")
        return d


def resolve_local(source: str | os.PathLike) -> Path:
    """The ``.onnx`` file of a local source: a file, an MLflow model folder, or its ``MLmodel`` file."""
    text = os.fspath(source)
    if "://" in text or is_mlflow_uri(text):
        raise BadInputError(f"{scrub(text)}: unsupported source (expected a .onnx file, an MLflow model directory "
                            "or runs:/RUN/PATH, models:/NAME/VERSION, models:/NAME@ALIAS, models:/m-ID)")
    path = Path(text).expanduser()
    if path.name == "MLmodel" and path.is_file():
        path = path.parent
    if path.is_dir():
        return onnx_in_model_dir(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such file or directory")
    if not path.is_file():
        raise BadInputError(f"{path}: not a regular file")
    return path


def onnx_in_model_dir(path: Path, label: str | None = None, require_mlmodel: bool = True) -> Path:
    """The .onnx file of an MLflow model folder: its onnx flavor's ``data``, else the only .onnx inside."""
    label = label or str(path)
    mlmodel = path / "MLmodel"
    flavors: dict = {}
    if mlmodel.is_file():
        try:
            import yaml

            meta = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
        except Exception as err:
            raise BadInputError(f"{label}: unreadable MLmodel file ({type(err).__name__})") from err
        flavors = (meta.get("flavors") or {}) if isinstance(meta, dict) else {}
        flavor = flavors.get("onnx") if isinstance(flavors, dict) else None
        if isinstance(flavor, dict) and isinstance(flavor.get("data"), str):
            candidate = (path / flavor["data"]).resolve()
            if path.resolve() not in candidate.parents:
                raise BadInputError(f"{label}: onnx flavor data {flavor['data']!r} escapes the model directory")
            if not candidate.is_file():
                raise BadInputError(f"{label}: onnx flavor names {flavor['data']!r}, which is missing")
            return candidate
    elif require_mlmodel:
        raise BadInputError(f"{label}: a directory without an MLmodel file (expected a .onnx file or an MLflow "
                            "model directory)")
    found = sorted(path.glob("*.onnx"))
    if len(found) == 1:
        return found[0]
    if not found and flavors:
        raise BadInputError(f"{label}: not an ONNX model (MLmodel flavors: {', '.join(sorted(flavors))})")
    what = "no .onnx file" if not found else f"{len(found)} .onnx files and no onnx flavor to choose"
    raise BadInputError(f"{label}: MLflow model directory with {what}")


def local_source_uri(path: Path) -> str:
    """The identity of a local source: its absolute path and the sha256 of the .onnx file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"{path.resolve().as_uri()}#sha256={digest.hexdigest()[:16]}"


@contextlib.contextmanager
def materialize(source: str | os.PathLike, store: "Registry | None" = None, *,
                identify_local: bool = False) -> Iterator[Resolved]:
    """Resolve ``source`` and make its .onnx file local for the duration of the block.

    Local sources need no store (mlflow is not imported). ``identify_local`` hashes a local file for its
    ``mlstep.source`` identity (needed only when it will be registered).
    """
    text = os.fspath(source)
    if not is_mlflow_uri(text):
        path = resolve_local(text)
        uri = local_source_uri(path) if identify_local else str(path.resolve())
        yield Resolved(requested=str(path) if "://" not in text else scrub(text), uri=uri, kind="local",
                       local_path=path)
        return
    store = store or Registry()
    workdir = Path(tempfile.mkdtemp(prefix="mlstep-source-"))
    try:
        yield store.resolve(text, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# -------------------------------------------------------------------------------------------- the store

def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the embedded default ``sqlite:///<cwd>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return uri
    return f"sqlite:///{Path.cwd().absolute() / DEFAULT_DB}"


def _shown(uri: str) -> str:
    """A URI fit for a message: no user info, no query string (tokens travel there sometimes)."""
    return scrub(uri.split("?", 1)[0])


_configured = False


def _configure() -> None:
    """Retry policy and quiet output for the mlflow client, once per process (before mlflow is imported)."""
    global _configured
    if _configured:
        return
    for ours, (theirs, default) in RETRY_DEFAULTS.items():
        value = (os.environ.get(ours) or os.environ.get(theirs) or default).strip()
        if not value.isdigit():       # MLflow reads all three as integers
            raise UsageError(f"{ours if os.environ.get(ours) else theirs}={value!r}: expected a whole number >= 0")
        os.environ[theirs] = value
    # The client prints the run's URL (with any user:password in it) to stdout when a run ends, progress
    # bars when it downloads, and INFO lines when it registers: the step reports all that itself.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    os.environ["MLFLOW_RECORD_ENV_VARS_IN_MODEL_LOGGING"] = "false"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    import mlflow  # noqa: F401  (configures its loggers on import)

    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _configured = True


def retry_policy() -> dict[str, float]:
    _configure()
    return {"retries": int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]),
            "backoff_s": int(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]),
            "timeout_s": int(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"])}


@dataclass
class Registration:
    """What the registration of one variant came to."""

    variant: str
    status: str                         # registered | existing | skipped (gate failed) | failed
    uri: str | None = None              # models:/NAME/VERSION
    alias: str | None = None
    error: str | None = None


@dataclass
class Publication:
    """The run record and the registrations of one step."""

    run_id: str | None = None
    experiment_id: str | None = None
    registrations: dict[str, Registration] = field(default_factory=dict)
    error: str | None = None


class Registry:
    """An MLflow tracking + registry store (see the module docstring for the URI and retry policy)."""

    def __init__(self, uri: str | None = None, registry_uri: str | None = None):
        _configure()
        import mlflow
        from mlflow import MlflowClient

        self.uri = uri or tracking_uri()
        self.registry_uri = registry_uri or os.environ.get("MLFLOW_REGISTRY_URI", "").strip() or self.uri
        self.shown = _shown(self.uri)
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.registry_uri)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.registry_uri)

    # --------------------------------------------------------------------------------- error boundary

    def call(self, what: str, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` with MLflow's failures turned into mlstep errors about ``what``."""
        try:
            return fn(*args, **kwargs)
        except MlstepError:
            raise
        except Exception as err:  # mlflow, requests, sqlalchemy: no common base
            raise self.translate(err, what) from err

    def translate(self, err: BaseException, what: str) -> MlstepError:
        code = getattr(err, "error_code", None)
        text = " ".join(scrub(str(err)).split())
        if code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in text):
            return BadInputError(f"{scrub(what)}: not found in MLflow at {self.shown}")
        if _unreachable(err, text):
            policy = retry_policy()
            retries = f"{policy['retries']} retr{'y' if policy['retries'] == 1 else 'ies'}"
            return RegistryError(f"MLflow at {self.shown} did not answer ({scrub(what)}; {retries} with backoff "
                                 f"{policy['backoff_s']}s, {_reason(text)})")
        if code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
            return BadInputError(f"{scrub(what)}: {_short(text)}")
        if code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or (
                re.search(r"\b40[13]\b", text) and re.search(r"unauthori|forbidden|authenticat|permission", text, re.I)):
            return RegistryError(f"{scrub(what)}: MLflow at {self.shown} refused the credentials ({_short(text)})")
        return RegistryError(f"{scrub(what)}: MLflow at {self.shown}: {type(err).__name__}: {_short(text)}")

    def ping(self) -> None:
        """Fail early (bounded retries, one line) when the store does not answer."""
        self.call("connect", self.client.search_experiments, max_results=1)

    # ------------------------------------------------------------------------------------- resolution

    def resolve(self, uri: str, workdir: Path) -> Resolved:
        """Resolve an MLflow URI to a concrete source and download it into ``workdir``."""
        shown = scrub(uri)
        kind, first, second = parse_uri(uri)
        if kind == "run":
            run = self.call(shown, self.client.get_run, first)
            concrete = f"runs:/{run.info.run_id}/{second}"
            local = self._download(concrete, workdir, shown)
            return Resolved(requested=shown, uri=concrete, kind="run", local_path=local,
                            name=self._name_of_run(run.info.run_id), run_id=run.info.run_id)
        if kind == "logged_model":
            logged = self.call(shown, self.client.get_logged_model, first)
            concrete = f"models:/{logged.model_id}"
            local = self._download(concrete, workdir, shown)
            return Resolved(requested=shown, uri=concrete, kind="logged_model", local_path=local,
                            name=self._name_of_logged_model(logged), run_id=logged.source_run_id,
                            model_id=logged.model_id)
        name, alias = first, None
        if kind == "alias":
            alias = second
            version = self.call(shown, self.client.get_model_version_by_alias, name, alias)
        elif second == "latest":
            found = self.call(shown, self.client.search_model_versions, _filter(name=name),
                              max_results=1, order_by=["version_number DESC"])
            if not found:
                raise BadInputError(f"{shown}: not found in MLflow at {self.shown}")
            version = found[0]
        else:
            version = self.call(shown, self.client.get_model_version, name, second)
        concrete = f"models:/{version.name}/{version.version}"
        local = self._download(concrete, workdir, f"{shown} ({concrete})" if concrete != shown else shown)
        return Resolved(requested=shown, uri=concrete, kind="model_version", local_path=local, name=version.name,
                        version=str(version.version), alias=alias, run_id=version.run_id or None,
                        model_id=getattr(version, "model_id", None) or None)

    def _download(self, uri: str, workdir: Path, label: str) -> Path:
        from mlflow.artifacts import download_artifacts

        got = Path(self.call(f"{label}: download", download_artifacts, artifact_uri=uri,
                             dst_path=str(workdir), tracking_uri=self.uri))
        if got.is_file():
            if got.suffix != ".onnx":
                raise BadInputError(f"{label}: not an ONNX model ({got.name})")
            return got
        return onnx_in_model_dir(got, label, require_mlmodel=False)

    def _name_of_run(self, run_id: str) -> str | None:
        versions = self.call(f"run {run_id}", self.client.search_model_versions, f"run_id = '{run_id}'")
        names = {v.name for v in versions}
        return names.pop() if len(names) == 1 else None

    def _name_of_logged_model(self, logged) -> str | None:
        if not logged.source_run_id:
            return None
        versions = self.call(f"models:/{logged.model_id}", self.client.search_model_versions,
                             f"run_id = '{logged.source_run_id}'")
        names = {v.name for v in versions if v.source == f"models:/{logged.model_id}"}
        return names.pop() if len(names) == 1 else None

    # ----------------------------------------------------------------------------------- idempotency

    def find_registered(self, name: str, source: str, options_hash: str, variant: str) -> str | None:
        """The version (lowest, if several) registered earlier for this key, or None."""
        query = _filter(name=name, tags={TAG_SOURCE: source, TAG_OPTIONS_HASH: options_hash, TAG_VARIANT: variant,
                                         TAG_GATES: "passed"})
        found = self.call(f"models:/{name}: search", self.client.search_model_versions, query)
        ok = [v for v in found if str(getattr(v, "status", "READY")) not in ("FAILED_REGISTRATION",)]
        return str(min(int(v.version) for v in ok)) if ok else None

    # ------------------------------------------------------------------------------------- the record

    def publish(self, report: dict, resolved: Resolved, variant_paths: Mapping[str, Path], *,
                register_as: str | None, aliases: Mapping[str, str], write: Callable[[dict], Sequence[Path]],
                evidence: Mapping[Path, str | None] | None = None, experiment: str | None = None) -> Publication:
        """Log the step's run and register its gate-passed variants (``register_as`` None: log only).

        ``write(report)`` writes report.json/report.md and returns their paths; it is called once the
        registrations are known (so the logged report names the versions), also after a failure.
        ``evidence`` maps further files to log to their artifact folder. ``report`` is updated in place:
        ``variants.*.registered`` and ``mlflow``.
        Raises ``RegistryError`` after writing the report when the store failed part-way.
        """
        pub = Publication()
        options_hash = report["options"]["options_hash"]
        run = self._start_run(report, resolved, experiment)
        pub.run_id, pub.experiment_id = run.info.run_id, run.info.experiment_id
        report["mlflow"] = self.record(resolved, register_as, pub)
        status = "FINISHED"
        try:
            self.call("log params", self.client.log_batch, pub.run_id, params=_params(report),
                      metrics=_metrics(report))
            if register_as:
                for variant, facts in report["variants"].items():
                    pub.registrations[variant] = Registration(
                        variant, "pending" if facts["gate"]["passed"] else "skipped", alias=aliases.get(variant) or None)
                for variant, facts in report["variants"].items():
                    reg = pub.registrations[variant]
                    if reg.status == "skipped":
                        continue
                    existing = self.find_registered(register_as, resolved.uri, options_hash, variant)
                    if existing is None:
                        version = self._log_and_register(pub.run_id, variant, Path(variant_paths[variant]),
                                                         register_as, resolved, options_hash, report)
                        reg.status = "registered"
                    else:
                        version, reg.status = existing, "existing"
                    reg.uri = f"models:/{register_as}/{version}"
                    facts["registered"] = reg.uri
                    if reg.alias:
                        self.call(f"alias {reg.alias}", self.client.set_registered_model_alias, register_as,
                                  reg.alias, version)
        except MlstepError as err:
            pub.error, status = str(err), "FAILED"
            for reg in pub.registrations.values():
                if reg.status == "pending":
                    reg.status, reg.error = "failed", pub.error
        report["mlflow"] = self.record(resolved, register_as, pub)
        files = list(write(report))
        # A store that stopped answering is not asked again (each call would wait out its retries).
        if pub.error is None or "did not answer" not in pub.error:
            try:
                for path, folder in [*((f, None) for f in files), *(evidence or {}).items()]:
                    self.call(f"log {path.name}", self.client.log_artifact, pub.run_id, str(path), folder)
                self.call("log tags", self.client.set_tag, pub.run_id, TAG_GATES,
                          "passed" if all(v["gate"]["passed"] for v in report["variants"].values()) else "failed")
            except MlstepError as err:
                pub.error, status = pub.error or str(err), "FAILED"
            if "did not answer" not in (pub.error or ""):
                with contextlib.suppress(MlstepError):
                    self.call("end run", self.client.set_terminated, pub.run_id, status)
        if pub.error:
            done = [f"{r.variant} {r.uri}" for r in pub.registrations.values() if r.uri]
            raise RegistryError(f"{pub.error} (registered so far: {', '.join(done) or 'nothing'}; "
                                "a re-run completes the registration without duplicates)")
        return pub

    def record(self, resolved: Resolved, register_as: str | None, pub: Publication | None = None) -> dict:
        """The report's ``mlflow`` section."""
        pub = pub or Publication()
        return {"tracking_uri": self.shown, "source": resolved.as_dict(), "experiment_id": pub.experiment_id,
                "run_id": pub.run_id, "registered_model": register_as,
                "registrations": {v: {"status": r.status, "uri": r.uri, "alias": r.alias}
                                  for v, r in pub.registrations.items()},
                "error": pub.error}

    def _start_run(self, report: dict, resolved: Resolved, experiment: str | None):
        name = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        exp = self.call(f"experiment {name}", self.client.get_experiment_by_name, name)
        if exp is None:
            try:
                experiment_id = self.client.create_experiment(name)
            except Exception as err:  # created meanwhile by a concurrent step
                exp = self.call(f"experiment {name}", self.client.get_experiment_by_name, name)
                if exp is None:
                    raise self.translate(err, f"experiment {name}") from err
                experiment_id = exp.experiment_id
        else:
            experiment_id = exp.experiment_id
        label = resolved.name or resolved.local_path.stem
        run_name = f"mlstep-{label}" + (f"-v{resolved.version}" if resolved.version else "")
        return self.call("start run", self.client.create_run, experiment_id, run_name=run_name,
                         tags=_run_tags(report, resolved))

    def _log_and_register(self, run_id: str, variant: str, path: Path, name: str, resolved: Resolved,
                          options_hash: str, report: dict) -> str:
        import mlflow
        import mlflow.onnx
        import onnx

        model = onnx.load(str(path))          # external data included: the flavor writes its own copy
        tags = {TAG_VARIANT: variant, TAG_SOURCE: resolved.uri, TAG_OPTIONS_HASH: options_hash, TAG_GATES: "passed"}
        with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None):
            info = self.call(f"log {variant} model", mlflow.onnx.log_model, model, name=variant,
                             pip_requirements=_requirements(), signature=_signature(model), tags=tags,
                             await_registration_for=0)
        self._ensure_registered_model(name)
        # One request creates the version *with* its key tags (and its description): no untagged version
        # can be left behind by a failure, so the idempotency search always sees what exists.
        version = self.call(f"register {variant} as {name}", self.client.create_model_version, name,
                            info.model_uri, run_id=run_id, tags=tags, model_id=info.model_id,
                            description=_description(variant, report, resolved), await_creation_for=60)
        return str(version.version)

    def _ensure_registered_model(self, name: str) -> None:
        try:
            self.client.create_registered_model(name, description="Registered by mlstep.")
        except Exception as err:
            if getattr(err, "error_code", None) not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise self.translate(err, f"models:/{name}") from err

    # ---------------------------------------------------------------------------------------- promote

    def promote(self, uri: str, alias: str) -> tuple[str, str, str | None]:
        """Point ``alias`` at the version ``uri`` names, only if its ``mlstep.gates`` tag is ``passed``.

        Returns (name, version, previous version or None). ``GateFailedError`` (exit 1) when refused.
        """
        check_alias(alias)
        shown = scrub(uri)
        kind, name, second = parse_uri(uri) if uri.startswith("models:/") else ("other", "", None)
        if kind == "alias":
            version = self.call(shown, self.client.get_model_version_by_alias, name, second)
        elif kind == "version" and second != "latest":
            version = self.call(shown, self.client.get_model_version, name, second)
        else:
            raise BadInputError(f"{shown}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
        concrete = f"models:/{version.name}/{version.version}"
        gates = (version.tags or {}).get(TAG_GATES)
        if gates != "passed":
            why = f"its {TAG_GATES} tag is {gates!r}" if gates else f"it has no {TAG_GATES} tag (not made by mlstep)"
            raise GateFailedError(f"refusing to point alias {alias!r} at {concrete}: {why}")
        previous = None
        with contextlib.suppress(BadInputError):
            previous = str(self.call("alias", self.client.get_model_version_by_alias, version.name, alias).version)
        self.call(f"alias {alias}", self.client.set_registered_model_alias, version.name, alias, version.version)
        return version.name, str(version.version), previous


# ---------------------------------------------------------------------------------------------- helpers

def _filter(name: str, tags: Mapping[str, str] | None = None) -> str:
    parts = [f"name = {_quote(name)}"]
    parts += [f"tags.`{k}` = {_quote(v)}" for k, v in (tags or {}).items()]
    return " and ".join(parts)


def _quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise BadInputError(f"{value!r}: names with both quote characters are not supported")


def _unreachable(err: BaseException, text: str) -> bool:
    import requests

    if isinstance(err, (requests.ConnectionError, requests.Timeout)):
        return True
    return any(s in text for s in ("Max retries exceeded", "Failed to establish a new connection",
                                   "Connection refused", "Read timed out", "ConnectTimeout",
                                   "too many 5", "RemoteDisconnected", "Connection broken",
                                   "Connection reset", "IncompleteRead"))


def _reason(text: str) -> str:
    for needle, reason in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                           ("Name or service not known", "unknown host"), ("too many 5", "server errors"),
                           ("RemoteDisconnected", "connection closed"), ("Connection broken", "connection broken"),
                           ("Connection reset", "connection reset"), ("IncompleteRead", "connection broken")):
        if needle in text:
            return reason
    return "no answer"


def _short(text: str, limit: int = 200) -> str:
    text = re.sub(r"https?://\S+", lambda m: _shown(m.group(0)), text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _flat(value: Any) -> str:
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(map(str, value))
    return str(value)


def _params(report: Mapping) -> list:
    """Every optimizer and step option, the detected model facts and the source resolution."""
    from mlflow.entities import Param

    params = {k: _flat(v) for k, v in report["options"].items()}
    params.update({"detected_model_type": report["model_type"], "detected_num_heads": report["num_heads"],
                   "detected_hidden_size": report["hidden_size"]})
    src = (report.get("mlflow") or {}).get("source") or {}
    params.update({f"source_{k}": v for k, v in src.items() if v is not None and k in ("uri", "alias", "version")})
    return [Param(k, scrub(str(v))[:6000]) for k, v in sorted(params.items())]


def metric_values(report: Mapping) -> dict[str, float]:
    """Fusion counts, parity, latency, speed-ups and optimizer time as flat metric names."""
    out: dict[str, float] = {"optimizer_seconds": report["optimizer_seconds"]}
    baseline = None
    for name, v in report["variants"].items():
        for op, count in v["fusions"].items():
            out[f"{name}.fusions.{op}"] = count
        out[f"{name}.fusions.total"] = sum(v["fusions"].values())
        if v["parity"]["max_abs_diff"] is not None:
            out[f"{name}.parity.max_abs_diff"] = v["parity"]["max_abs_diff"]
        for key in ("median", "p90", "p95"):
            if v["latency_ms"][key] is not None:
                out[f"{name}.latency_ms.{key}"] = v["latency_ms"][key]
        if v["latency_ms"]["speedup"] is not None:
            out[f"{name}.speedup"] = v["latency_ms"]["speedup"]
        baseline = baseline or v["latency_ms"]["baseline_median"]
        out[f"{name}.gate.passed"] = 1.0 if v["gate"]["passed"] else 0.0
    if baseline is not None:
        out["baseline.latency_ms.median"] = baseline
    return {k: float(val) for k, val in out.items() if val is not None}


def _metrics(report: Mapping) -> list:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(k, v, now, 0) for k, v in metric_values(report).items()]


def ci_tags(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The GitHub Actions context, when present."""
    env = os.environ if env is None else env
    tags = {}
    for var, tag in (("GITHUB_REPOSITORY", "github.repository"), ("GITHUB_RUN_ID", "github.run_id"),
                     ("GITHUB_RUN_ATTEMPT", "github.run_attempt"), ("GITHUB_SHA", "github.sha"),
                     ("GITHUB_REF", "github.ref"), ("GITHUB_WORKFLOW", "github.workflow"),
                     ("GITHUB_JOB", "github.job"), ("GITHUB_ACTOR", "github.actor")):
        if env.get(var):
            tags[tag] = scrub(env[var])
    if env.get("GITHUB_REPOSITORY") and env.get("GITHUB_RUN_ID"):
        server = _shown(env.get("GITHUB_SERVER_URL") or "https://github.com").rstrip("/")
        tags["github.run_url"] = f"{server}/{env['GITHUB_REPOSITORY']}/actions/runs/{env['GITHUB_RUN_ID']}"
    if env.get("GITHUB_SHA"):
        tags["mlflow.source.git.commit"] = env["GITHUB_SHA"]
    return tags


def _run_tags(report: Mapping, resolved: Resolved) -> dict[str, str]:
    tags = {TAG_SOURCE: resolved.uri, "mlstep.source_requested": resolved.requested,
            TAG_OPTIONS_HASH: report["options"]["options_hash"], "mlstep.version": __version__,
            "mlstep.model_type": str(report["model_type"]), "mlflow.source.type": "JOB"}
    if resolved.alias:
        tags["mlstep.source_alias"] = resolved.alias
    tags.update(ci_tags())
    return {k: scrub(str(v)) for k, v in tags.items()}


def _requirements() -> list[str]:
    """Pinned explicitly: MLflow's inference would load the model in a subprocess just to guess these."""
    import onnx

    reqs = [f"onnx=={onnx.__version__}"]
    try:
        import onnxruntime

        reqs.append(f"onnxruntime>={onnxruntime.__version__.split('+')[0]}")
    except ImportError:
        pass
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


def _description(variant: str, report: Mapping, resolved: Resolved) -> str:
    v = report["variants"][variant]
    fused = ", ".join(f"{op} x{n}" for op, n in v["fusions"].items()) or "no fusions"
    parts = [f"mlstep {__version__}: {variant} variant of {resolved.uri}", f"fused: {fused}"]
    if v["parity"]["max_abs_diff"] is not None:
        parts.append(f"parity max |diff| {v['parity']['max_abs_diff']:.2e}")
    if v["latency_ms"]["speedup"] is not None:
        parts.append(f"speedup {v['latency_ms']['speedup']:.2f}x")
    return scrub("; ".join(parts))


def promote(uri: str, alias: str) -> tuple[str, str, str | None]:
    return Registry().promote(uri, alias)
