"""Sources: what the user named, resolved to a concrete model and its bytes on disk.

::

    runs:/RUN_ID/PATH          an artifact (an MLflow model folder or a .onnx file) of a run
    models:/NAME/VERSION       a registered model version
    models:/NAME@ALIAS         resolved to its version first (the alias may move while the step runs)
    models:/NAME/latest        the highest version that is not one of mlstep's own variants
    models:/m-ID               an MLflow 3 LoggedModel
    DIR | DIR/MLmodel          a local MLflow model folder (onnx flavor, or exactly one .onnx inside)
    FILE.onnx                  a local file

Each resolves to a :class:`Resolved` with the sha256 of the model's bytes (the .onnx file and every
external-data file it names): the content, not the URI, identifies a source, so the same bytes reached as
``models:/N/1``, ``runs:/RUN/model`` or ``models:/m-ID`` are one source. A source that is itself an mlstep
variant (tagged ``mlstep.variant``, or an artifact of an mlstep run) is refused in one line naming the
version it came from: optimizing a variant again would register fp16-of-fp16.

Downloads go to a temporary folder that lives until the ``with`` block of :func:`materialize` ends.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlstep.errors import BadInputError, UsageError
from mlstep.redact import scrub

if TYPE_CHECKING:
    from mlstep.registry.store import Store

MLFLOW_SCHEMES = ("runs:/", "models:/")
MAX_NAME_BYTES = 255          # MLflow's limit for names, aliases and tag keys (the sqlite store's column width)
TAG_VARIANT = "mlstep.variant"
TAG_SOURCE = "mlstep.source"
TAG_MLSTEP_RUN = "mlstep.version"          # set on every run mlstep logs

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


def check_name(name: str, what: str = "registered model name") -> str:
    """A registered model name MLflow can store: not blank, at most 255 bytes, no control characters."""
    if not name or not name.strip():
        raise UsageError(f"empty {what}")
    size = len(name.encode("utf-8"))
    if size > MAX_NAME_BYTES:
        raise UsageError(f"{what} is {size} bytes long (MLflow allows at most {MAX_NAME_BYTES}): "
                         f"{scrub(name[:40])}...")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise UsageError(f"{what} {scrub(name)!r} holds control characters")
    return name


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
        check_name(name)
        return "alias", name, alias
    name, _, number = rest.rpartition("/")
    if not name or not number:
        raise BadInputError(f"{shown}: expected models:/NAME/VERSION, models:/NAME@ALIAS or models:/m-ID")
    check_name(name)
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
    sha256: str | None = None           # the source's bytes (+ external data): the idempotency key's half

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


# ------------------------------------------------------------------------------------------ local files

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


def _external_locations(path: Path) -> list[str]:
    """The external-data files the model's tensors name (initializers, Constant attributes, subgraphs)."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:
        raise BadInputError(f"{path.name}: not a readable ONNX model ({type(err).__name__})") from err
    found: set[str] = set()

    def tensors_of(graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                if attr.HasField("g"):
                    yield from tensors_of(attr.g)
                for sub in attr.graphs:
                    yield from tensors_of(sub)

    for tensor in tensors_of(model.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            location = next((e.value for e in tensor.external_data if e.key == "location"), None)
            if location:
                found.add(location)
    return sorted(found)


def _update(digest, path: Path) -> None:
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def source_digest(path: Path) -> str:
    """sha256 of the .onnx file's bytes, then of each external-data file it names (by name, then bytes)."""
    digest = hashlib.sha256()
    _update(digest, path)
    root = path.parent.resolve()
    for location in _external_locations(path):
        data = (root / location).resolve()
        if root not in data.parents or not data.is_file():
            raise BadInputError(f"{path.name}: external data {location!r} is missing or outside the model's folder")
        digest.update(b"\0" + location.encode("utf-8") + b"\0")
        _update(digest, data)
    return digest.hexdigest()


def local_source_uri(path: Path, sha256: str) -> str:
    """The recorded identity of a local source: its absolute path and (a prefix of) its content hash."""
    return f"{path.resolve().as_uri()}#sha256={sha256[:16]}"


@contextlib.contextmanager
def materialize(source: str | os.PathLike, store: "Store | None" = None, *,
                identify_local: bool = False) -> Iterator[Resolved]:
    """Resolve ``source`` and make its .onnx file local for the duration of the block.

    Local sources need no store (mlflow is not imported). ``identify_local`` hashes a local file (needed
    only when it will be registered); MLflow sources are always hashed.
    """
    text = os.fspath(source)
    if not is_mlflow_uri(text):
        path = resolve_local(text)
        requested = str(path) if "://" not in text else scrub(text)
        if identify_local:
            sha = source_digest(path)
            yield Resolved(requested=requested, uri=local_source_uri(path, sha), kind="local", local_path=path,
                           sha256=sha)
        else:
            yield Resolved(requested=requested, uri=str(path.resolve()), kind="local", local_path=path)
        return
    if store is None:
        from mlstep.registry.store import Store

        store = Store(reading=text)
    workdir = Path(tempfile.mkdtemp(prefix="mlstep-source-"))
    try:
        yield resolve(store, text, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# --------------------------------------------------------------------------------------------- MLflow

def resolve(store: "Store", uri: str, workdir: Path) -> Resolved:
    """Resolve an MLflow URI to a concrete source, refuse mlstep's own variants, download and hash it."""
    shown = scrub(uri)
    kind, first, second = parse_uri(uri)
    client = store.client
    if kind == "run":
        run = store.call(shown, client.get_run, first)
        if TAG_MLSTEP_RUN in (run.data.tags or {}):
            made_from = run.data.tags.get(TAG_SOURCE, "its source")
            raise BadInputError(f"{shown}: an artifact of an mlstep run (made from {made_from}); "
                                f"optimize {made_from} instead")
        concrete = f"runs:/{run.info.run_id}/{second}"
        local = _download(store, concrete, workdir, shown)
        return Resolved(requested=shown, uri=concrete, kind="run", local_path=local,
                        name=_name_of_run(store, run.info.run_id), run_id=run.info.run_id,
                        model_id=_logged_model_of_run(store, run, second), sha256=source_digest(local))
    if kind == "logged_model":
        logged = store.call(shown, client.get_logged_model, first)
        _refuse_variant(shown, f"models:/{logged.model_id}", logged.tags or {})
        concrete = f"models:/{logged.model_id}"
        local = _download(store, concrete, workdir, shown)
        return Resolved(requested=shown, uri=concrete, kind="logged_model", local_path=local,
                        name=_name_of_logged_model(store, logged), run_id=logged.source_run_id,
                        model_id=logged.model_id, sha256=source_digest(local))
    name, alias = first, None
    if kind == "alias":
        alias = second
        version = store.call(shown, client.get_model_version_by_alias, name, alias)
    elif second == "latest":
        version = _latest_source(store, name, shown)
    else:
        version = store.call(shown, client.get_model_version, name, second)
    concrete = f"models:/{version.name}/{version.version}"
    label = f"{shown} ({concrete})" if concrete != shown else shown
    _refuse_variant(label, concrete, version.tags or {})
    local = _download(store, concrete, workdir, label)
    return Resolved(requested=shown, uri=concrete, kind="model_version", local_path=local, name=version.name,
                    version=str(version.version), alias=alias, run_id=version.run_id or None,
                    model_id=model_id_of_version(version), sha256=source_digest(local))


def model_id_of_version(version) -> str | None:
    """The LoggedModel behind a registered version: its ``model_id`` when the store keeps one, else the
    ``models:/m-ID`` its source names (MLflow's SQL registry records only the source)."""
    model_id = getattr(version, "model_id", None)
    if model_id:
        return model_id
    source = getattr(version, "source", None) or ""
    rest = source[len("models:/"):] if source.startswith("models:/") else ""
    return rest if rest.startswith("m-") and "/" not in rest else None


def _refuse_variant(label: str, concrete: str, tags) -> None:
    variant = tags.get(TAG_VARIANT)
    if variant:
        made_from = tags.get(TAG_SOURCE) or "an unrecorded source"
        raise BadInputError(f"{label}: {concrete} is mlstep's {variant} variant of {made_from}; "
                            f"optimize {made_from} instead")


def _latest_source(store: "Store", name: str, shown: str):
    """The highest version of ``name`` that is not an mlstep variant (mlstep's output never becomes its input)."""
    from mlstep.registry.store import filter_string

    found = store.call(shown, store.client.search_model_versions, filter_string(name=name),
                       order_by=["version_number DESC"])
    for version in found:
        if TAG_VARIANT not in (version.tags or {}):
            return version
    if found:
        raise BadInputError(f"{shown}: every version of {name} is an mlstep variant; name a source version")
    raise BadInputError(f"{shown}: not found in MLflow at {store.shown}")


def _download(store: "Store", uri: str, workdir: Path, label: str) -> Path:
    from mlflow.artifacts import download_artifacts

    target = Path(tempfile.mkdtemp(dir=workdir))
    got = Path(store.call(f"{label}: download", download_artifacts, artifact_uri=uri, dst_path=str(target),
                          tracking_uri=store.uri))
    if got.is_file():
        if got.suffix != ".onnx":
            raise BadInputError(f"{label}: not an ONNX model ({got.name})")
        return got
    return onnx_in_model_dir(got, label, require_mlmodel=False)


def _name_of_run(store: "Store", run_id: str) -> str | None:
    versions = store.call(f"run {run_id}", store.client.search_model_versions, f"run_id = '{run_id}'")
    names = {v.name for v in versions}
    return names.pop() if len(names) == 1 else None


def _logged_model_of_run(store: "Store", run, path: str) -> str | None:
    """The LoggedModel a ``runs:/RUN/PATH`` names (MLflow 3 logs ``name=PATH`` as a model output of the run)."""
    outputs = run.outputs.model_outputs if run.outputs else []
    for output in outputs:
        logged = store.call(f"models:/{output.model_id}", store.client.get_logged_model, output.model_id)
        if logged.name == path:
            return logged.model_id
    return None


def _name_of_logged_model(store: "Store", logged) -> str | None:
    if not logged.source_run_id:
        return None
    versions = store.call(f"models:/{logged.model_id}", store.client.search_model_versions,
                          f"run_id = '{logged.source_run_id}'")
    names = {v.name for v in versions if v.source == f"models:/{logged.model_id}"}
    return names.pop() if len(names) == 1 else None
