"""Promote: move an alias to a version only on evidence, never on a tag anyone can write.

A version may be promoted when all of these hold:

1. it carries ``mlstep.variant`` (which variant it claims to be);
2. its own run (``version.run_id``) is an mlstep run (tagged ``mlstep.version``);
3. that run holds mlstep's ``report.json``, whose gate for that variant passed;
4. the report names this very version for that variant (``mlflow.registrations.<variant>.uri``);
5. the sha256 of the version's model files (downloaded now) equals the one the report recorded.

A hand-made version tagged ``mlstep.gates=passed`` fails 2-5 and is refused (``GateFailedError``, exit 1).
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from mlstep.errors import BadInputError, GateFailedError
from mlstep.redact import scrub
from mlstep.registry.publish import model_digest
from mlstep.registry.sources import TAG_MLSTEP_RUN, TAG_VARIANT, check_alias, parse_uri
from mlstep.registry.store import Store

REPORT = "report.json"


@dataclass(frozen=True)
class Promotion:
    name: str
    version: str
    alias: str
    previous: str | None            # the version the alias named before (None: it named none)


def promote(store: Store, uri: str, alias: str) -> Promotion:
    """Point ``alias`` at the version ``uri`` names (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``)
    when the evidence holds (module docstring); ``GateFailedError`` names what is missing."""
    kind, name, second = check_request(uri, alias)
    shown = scrub(uri)
    client = store.client
    if kind == "alias":
        version = store.call(shown, client.get_model_version_by_alias, name, second)
    else:
        version = store.call(shown, client.get_model_version, name, second)
    concrete = f"models:/{version.name}/{version.version}"
    why = _evidence_missing(store, version, concrete)
    if why:
        raise GateFailedError(f"refusing to point alias {alias!r} at {concrete}: {why}")
    previous = None
    with contextlib.suppress(BadInputError):
        previous = str(store.call("alias", client.get_model_version_by_alias, version.name, alias).version)
    store.set_alias(version.name, alias, version.version)
    return Promotion(version.name, str(version.version), alias, previous)


def check_request(uri: str, alias: str) -> tuple[str, str, str]:
    """``(kind, name, version-or-alias)`` of a promote request, checked before any store is touched."""
    check_alias(alias)
    kind, name, second = parse_uri(uri) if uri.startswith("models:/") else ("other", "", None)
    if kind not in ("alias", "version") or second == "latest":
        raise BadInputError(f"{scrub(uri)}: expected models:/NAME/VERSION or models:/NAME@ALIAS")
    return kind, name, second


def _evidence_missing(store: Store, version, concrete: str) -> str | None:
    """None when the version's own run proves it passed; else the reason, in words."""
    variant = (version.tags or {}).get(TAG_VARIANT)
    if not variant:
        return f"it has no {TAG_VARIANT} tag (not made by mlstep)"
    if not version.run_id:
        return "it has no run (not made by mlstep)"
    run = store.call(f"run {version.run_id}", store.client.get_run, version.run_id)
    if TAG_MLSTEP_RUN not in (run.data.tags or {}):
        return f"its run {version.run_id} is not an mlstep run"
    with tempfile.TemporaryDirectory(prefix="mlstep-promote-") as tmp:
        names = {a.path for a in store.call(f"run {version.run_id}", store.client.list_artifacts, version.run_id)}
        if REPORT not in names:
            return f"its run {version.run_id} holds no mlstep report (the step did not finish: re-run it)"
        path = store.call(f"run {version.run_id}: {REPORT}", store.client.download_artifacts, version.run_id,
                          REPORT, tmp)
        try:
            report = json.loads(Path(path).read_text(encoding="utf-8"))
            gate = report["variants"][variant]["gate"]
            registration = (report.get("mlflow") or {}).get("registrations", {}).get(variant) or {}
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"its run's {REPORT} has no {variant} gate (not an mlstep report)"
        if not (isinstance(gate, dict) and gate.get("passed") is True):
            return f"its run's report says the {variant} gate failed"
        if registration.get("uri") != concrete:
            return f"its run's report does not name this version as the {variant} variant " \
                   f"(it names {registration.get('uri')})"
        expected = registration.get("sha256")
        if not expected:
            return f"its run's report records no content hash for {variant}"
        from mlflow.artifacts import download_artifacts

        local = Path(store.call(f"{concrete}: download", download_artifacts, artifact_uri=concrete,
                                dst_path=str(Path(tmp) / "model"), tracking_uri=store.uri))
        actual = model_digest(local if local.is_dir() else local.parent)
        if actual != expected:
            return f"its content (sha256 {actual[:12]}) is not what the report recorded ({expected[:12]})"
    return None
