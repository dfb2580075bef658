"""The run's evidence: ``report.json`` (machine) and ``report.md`` (human; also a GitHub job summary).

report.json has exactly the contract's shape (DESIGN.md, "Contracts") plus ``optimizer_seconds`` and
``mlflow`` (null unless the step talked to MLflow)::

    {"source", "model_type", "num_heads", "hidden_size", "options", "optimizer_seconds", "mlflow",
     "variants": {"fp32": {"path", "fusions": {op: count},
                           "parity": {"max_abs_diff", "passed", "worst_output"},
                           "latency_ms": {"median", "p90", "p95", "baseline_median", "speedup"},
                           "gate": {"parity", "latency", "passed"},
                           "registered": "models:/NAME/VERSION" | null},
                  "fp16": {...}}}

- ``path`` is relative to the report's folder (the output folder is assembled elsewhere and moved into
  place, so an absolute path would be stale).
- A skipped stage keeps its keys with ``null`` values (``--skip-validation``: parity values are null).
- ``gate.parity`` / ``gate.latency`` are ``"passed" | "failed" | "skipped" | "not_gated"``; latency is not
  gated yet (the pytest-benchmark gates come in a later issue). ``gate.passed`` is true when no gate failed.
- Non-finite numbers (a NaN difference) are written as null: the file stays strict JSON.
- ``mlflow``: ``{"tracking_uri" (credentials removed), "source": {"requested", "uri", "kind", "name",
  "version", "alias", "run_id", "model_id"} (the resolution, e.g. ``models:/m@candidate`` ->
  ``models:/m/3``), "experiment_id", "run_id", "registered_model", "registrations": {variant: {"status":
  "registered" | "existing" | "skipped" | "failed", "uri", "alias"}}, "error"}``.
- Credentials never appear: ``user:password@`` in any URI is replaced by ``***@``, and the values of the
  secret-bearing environment variables (``MLFLOW_TRACKING_TOKEN``, ``MLFLOW_TRACKING_PASSWORD``, ...) are
  replaced by ``***`` wherever they occur.
"""
from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlstep.errors import OutputError
from mlstep.redact import SECRET_ENV, scrub  # noqa: F401  (re-exported: mlstep.report.scrub keeps working)

GATE_STATES = ("passed", "failed", "skipped", "not_gated")


@dataclass
class VariantFacts:
    """What one variant produced; ``parity``/``latency`` are None when their stage was skipped."""

    path: str                                  # relative to the report folder, e.g. "fp32/model.onnx"
    fusions: dict[str, int] = field(default_factory=dict)
    parity: Any = None                         # mlstep.validate.parity.ParityResult
    latency: Any = None                        # mlstep.bench.LatencyStats of the variant
    baseline: Any = None                       # mlstep.bench.LatencyStats of the unoptimized source
    registered: str | None = None


def build_report(source: str, model_type: str, num_heads: int, hidden_size: int, options: Mapping[str, Any],
                 variants: Mapping[str, VariantFacts], optimizer_seconds: float,
                 mlflow: Mapping[str, Any] | None = None) -> dict:
    report = {
        "source": str(source),
        "model_type": model_type,
        "num_heads": int(num_heads),
        "hidden_size": int(hidden_size),
        "options": dict(options),
        "optimizer_seconds": round(float(optimizer_seconds), 4),
        "mlflow": dict(mlflow) if mlflow is not None else None,
        "variants": {name: _variant(facts) for name, facts in variants.items()},
    }
    return _clean(report)


def _variant(facts: VariantFacts) -> dict:
    parity = {"max_abs_diff": None, "passed": None, "worst_output": None}
    if facts.parity is not None:
        parity = {"max_abs_diff": float(facts.parity.max_abs_diff), "passed": bool(facts.parity.passed),
                  "worst_output": facts.parity.worst_output}
    latency = {"median": None, "p90": None, "p95": None, "baseline_median": None, "speedup": None}
    if facts.latency is not None:
        latency.update(median=facts.latency.median_ms, p90=facts.latency.p90_ms, p95=facts.latency.p95_ms)
        if facts.baseline is not None:
            latency["baseline_median"] = facts.baseline.median_ms
            if facts.latency.median_ms > 0:
                latency["speedup"] = facts.baseline.median_ms / facts.latency.median_ms
    latency = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in latency.items()}
    gate = {
        "parity": "skipped" if parity["passed"] is None else ("passed" if parity["passed"] else "failed"),
        "latency": "skipped" if facts.latency is None else "not_gated",
    }
    gate["passed"] = "failed" not in gate.values()
    return {"path": facts.path, "fusions": dict(sorted(facts.fusions.items())), "parity": parity,
            "latency_ms": latency, "gate": gate, "registered": facts.registered}


def gates_passed(report: Mapping) -> bool:
    return all(v["gate"]["passed"] for v in report["variants"].values())


def failed_gates(report: Mapping) -> list[str]:
    """One phrase per failed gate, e.g. ``fp16 parity (max |diff| 3.1e-02 on 'logits')``."""
    out = []
    for name, v in report["variants"].items():
        if v["gate"]["parity"] == "failed":
            diff = v["parity"]["max_abs_diff"]
            diff_text = "nan" if diff is None else f"{diff:.2e}"
            out.append(f"{name} parity (max |diff| {diff_text} on {v['parity']['worst_output']!r})")
        if v["gate"]["latency"] == "failed":
            out.append(f"{name} latency (speedup {v['latency_ms']['speedup']})")
    return out


def write_report(report: Mapping, directory: str | os.PathLike, fusion_log: Sequence | None = None) -> tuple[Path, Path]:
    """Write ``report.json`` and ``report.md`` into ``directory``; ``fusion_log`` (FusionLog list) adds the
    per-fusion log to the markdown (the CLI passes it with ``--verbose``)."""
    directory = Path(directory)
    json_path, md_path = directory / "report.json", directory / "report.md"
    try:
        json_path.write_text(json.dumps(_clean(report), indent=2, allow_nan=False) + "\n", encoding="utf-8")
        md_path.write_text(render_markdown(report, fusion_log), encoding="utf-8")
    except OSError as err:
        raise OutputError(f"cannot write the report in {directory}: {err.strerror or err}") from err
    return json_path, md_path


def fusion_table(report: Mapping) -> tuple[list[str], list[list[str]]]:
    """Fused op type x variant counts (shared by report.md and the CLI summary)."""
    names = list(report["variants"])
    ops = sorted({op for v in report["variants"].values() for op in v["fusions"]})
    rows = [[op] + [str(report["variants"][n]["fusions"].get(op, 0)) for n in names] for op in ops]
    return ["fused op"] + names, rows


def summary_table(report: Mapping) -> tuple[list[str], list[list[str]]]:
    """One row per variant: fused ops, parity, latency, speedup, gate (report.md and the CLI summary)."""
    header = ["variant", "fused", "max |diff|", "parity", "ms", "source ms", "speedup", "gate"]
    registering = bool((report.get("mlflow") or {}).get("registered_model"))
    if registering:
        header.append("registered")
    rows = []
    for name, v in report["variants"].items():
        lat, par = v["latency_ms"], v["parity"]
        rows.append([
            name, str(sum(v["fusions"].values())),
            "-" if par["max_abs_diff"] is None else f"{par['max_abs_diff']:.2e}",
            v["gate"]["parity"],
            _num(lat["median"]), _num(lat["baseline_median"]),
            "-" if lat["speedup"] is None else f"{lat['speedup']:.2f}x",
            "passed" if v["gate"]["passed"] else "FAILED",
        ])
        if registering:
            status = (report["mlflow"].get("registrations") or {}).get(name, {}).get("status")
            rows[-1].append(v["registered"] + (" (existing)" if status == "existing" else "")
                            if v.get("registered") else ("not registered" if status == "skipped" else "-"))
    return header, rows


def no_fusions(report: Mapping) -> bool:
    return not any(v["fusions"] for v in report["variants"].values())


def render_markdown(report: Mapping, fusion_log: Sequence | None = None) -> str:
    verdict = "all gates passed" if gates_passed(report) else "**a gate failed**: " + "; ".join(failed_gates(report))
    lines = [
        "# mlstep optimize",
        "",
        f"- source: `{scrub(str(report['source']))}`" + _resolution(report),
        f"- model: {report['model_type']}, {report['num_heads']} heads, hidden size {report['hidden_size']}",
        f"- optimizer: {report['optimizer_seconds']:.2f} s",
        f"- result: {verdict}",
        "",
        "## Summary",
        "",
        *_md_table(*summary_table(report)),
        "",
        "## Fusions",
        "",
    ]
    if no_fusions(report):
        lines.append("No fusions applied: the variants are the source graph (cleaned up, precision converted).")
    else:
        lines += _md_table(*fusion_table(report))
    lines += ["", "## Parity", ""]
    lines += _md_table(["variant", "max |diff|", "worst output", "result"], [
        [n, "-" if v["parity"]["max_abs_diff"] is None else f"{v['parity']['max_abs_diff']:.3e}",
         f"`{v['parity']['worst_output']}`" if v["parity"]["worst_output"] else "-", v["gate"]["parity"]]
        for n, v in report["variants"].items()])
    lines += ["", "## Latency (ms)", ""]
    lines += _md_table(["variant", "median", "p90", "p95", "baseline median", "speedup"], [
        [n, _num(v["latency_ms"]["median"]), _num(v["latency_ms"]["p90"]), _num(v["latency_ms"]["p95"]),
         _num(v["latency_ms"]["baseline_median"]),
         "-" if v["latency_ms"]["speedup"] is None else f"{v['latency_ms']['speedup']:.2f}x"]
        for n, v in report["variants"].items()])
    lines += _mlflow_section(report)
    lines += ["", "## Options", ""]
    lines += _md_table(["option", "value"], [[k, f"`{_fmt(v)}`"] for k, v in report["options"].items()])
    if fusion_log:
        lines += ["", "## Fusion log", ""]
        for entry in fusion_log:
            lines.append(f"- **{entry.name}**: fused {entry.fused}")
            lines += [f"  - refused: {scrub(str(reason))}" for reason in entry.refused]
    return "\n".join(lines) + "\n"


def _resolution(report: Mapping) -> str:
    src = (report.get("mlflow") or {}).get("source") or {}
    uri = src.get("uri")
    return f" -> `{scrub(uri)}`" if uri and uri != report["source"] and src.get("kind") != "local" else ""


def _mlflow_section(report: Mapping) -> list[str]:
    record = report.get("mlflow")
    if not record:
        return []
    lines = ["", "## MLflow", "", f"- tracking: `{scrub(str(record.get('tracking_uri')))}`"]
    if record.get("run_id"):
        lines.append(f"- run: `{record['run_id']}` (experiment {record.get('experiment_id')})")
    if record.get("registered_model"):
        lines.append(f"- registered model: `{record['registered_model']}`")
        rows = [[n, r.get("status", "-"), f"`{r['uri']}`" if r.get("uri") else "-",
                 f"`{r['alias']}`" if r.get("alias") and r.get("uri") else "-"]
                for n, r in (record.get("registrations") or {}).items()]
        if rows:
            lines += [""] + _md_table(["variant", "registration", "version", "alias"], rows)
    else:
        lines.append("- registration: off (local source without --register-as, or --no-register)")
    if record.get("error"):
        lines.append(f"- **registry error**: {scrub(str(record['error']))}")
    return lines


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    def row(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [row(header), "|" + "|".join("---" for _ in header) + "|"] + [row(r) for r in rows]


def _num(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _fmt(value) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def _clean(obj):
    """Scrub credentials from every string and make every number strict-JSON (non-finite -> null)."""
    if isinstance(obj, Mapping):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, str):
        return scrub(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if hasattr(obj, "item") and not isinstance(obj, (bool, int, float)):   # numpy scalars
        return _clean(obj.item())
    return obj
