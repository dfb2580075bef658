"""The run's evidence: ``report.json`` (machine) and ``report.md`` (human; also a GitHub job summary).

It is rendered by ONE function, :func:`render`, from the run's facts (:class:`RunFacts`: what was
measured) and the gates' verdicts (:mod:`mlstep.gates`: what was decided), once; nothing edits the dict or
the files afterwards. report.json has the contract's shape (DESIGN.md, "Contracts") plus
``optimizer_seconds``, ``coverage``, ``notes``, ``runtime`` and ``mlflow`` (null unless the step talked to
MLflow)::

    {"source", "model_type", "num_heads", "hidden_size", "options", "optimizer_seconds", "mlflow",
     "runtime": {"providers": [...], "use_gpu", "gpu_fallback": "--use-gpu: ran on the CPU because ..." | null},
     "coverage": {"state", "reason", "blocks": {kind: {"detected", "fused", "misses"}}},
     "notes": [...],
     "forms": {"chosen", "reason", "measured", "provider", "session": {"graph_optimization_level",
               "intra_op_threads", "threads_setting"}, "shapes", "seconds", "candidates": [{"name",
               "description", "disabled_fusions", "fusions", "parity": {"passed", "max_abs_diff"},
               "median_ms": {shape: ms}, "rounds", "iterations", "relative_to_fused", "chosen"}]} | null,
     "variants": {"fp32": {"path", "fusions": {op: count},
                           "parity": {"max_abs_diff", "passed", "worst_output", "worst_case", "cases"},
                           "latency_ms": {"median", "p90", "p95", "baseline_median", "speedup",
                                          "speedup_interval"},
                           "gate": {"parity", "latency", "coverage", "passed", "reasons"},
                           "registered": "models:/NAME/VERSION" | null},
                  "fp16": {...}}}

- ``parity.not_compared`` (only for a variant whose attention fusion leaves padded rows unspecified, see
  ``mlstep.validate.parity``): ``{"mask", "values", "max_abs_diff", "per_output", "reason"}``, the values left
  out of the comparison and why, in plain words (also in report.md under Parity).
- ``path`` is relative to the report's folder (the output folder is assembled elsewhere and moved into
  place, so an absolute path would be stale).
- A skipped stage keeps its keys with ``null`` values (``--skip-validation``: parity values are null).
- ``gate.parity`` / ``gate.latency`` / ``gate.coverage`` are ``"passed" | "failed" | "skipped" |
  "not_gated"`` (``mlstep.gates``); ``gate.reasons`` says why for each; ``gate.passed`` is true when no gate
  failed. ``speedup`` is the latency gate's estimate (geometric mean of paired per-block ratios) and
  ``speedup_interval`` its 95% interval.
- Non-finite numbers (a NaN difference) are written as null: the file stays strict JSON.
- ``mlflow``: ``{"tracking_uri" (credentials removed), "source": {"requested", "uri", "kind", "name",
  "version", "alias", "run_id", "model_id"} (the resolution, e.g. ``models:/m@candidate`` ->
  ``models:/m/3``), "experiment_id", "run_id", "run_status", "key", "registered_model", "registrations":
  {variant: {"status": "registered" | "existing" | "skipped" | "failed", "uri", "alias", "sha256"}},
  "removed_duplicates", "ended_stale_runs", "error"}`` (``mlstep.registry.record``: ``mlstep promote`` reads
  ``registrations``
  and ``variants.*.gate.passed`` back from the run's copy of this file as its evidence).
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


@dataclass(frozen=True)
class VariantFacts:
    """What one variant produced; ``parity``/``latency`` are None when their stage was skipped."""

    path: str                                  # relative to the report folder, e.g. "fp32/model.onnx"
    fusions: dict[str, int] = field(default_factory=dict)
    parity: Any = None                         # mlstep.validate.parity.ParityResult
    latency: Any = None                        # mlstep.bench.gates.VariantGate
    baseline: Any = None                       # mlstep.bench.LatencyStats of the unoptimized source
    registered: str | None = None
    precision: Mapping[str, Any] | None = None  # mlstep.variants.precision_facts: ops kept in float32, why


@dataclass(frozen=True)
class RunFacts:
    """Everything the run measured or resolved (no decisions: those are the verdicts)."""

    source: str
    model_type: str
    num_heads: int
    hidden_size: int
    options: Mapping[str, Any]
    optimizer_seconds: float
    variants: Mapping[str, VariantFacts]
    coverage: Mapping[str, Any] = field(default_factory=dict)    # kind -> optimizer.coverage.BlockCoverage
    notes: Sequence[str] = ()
    mlflow: Mapping[str, Any] | None = None
    runtime: Mapping[str, Any] | None = None    # {"providers", "use_gpu", "gpu_fallback": one line | None}
    forms: Mapping[str, Any] | None = None                       # mlstep.forms.Selection.as_dict()


def build(facts: RunFacts, verdicts: Mapping[str, Any], coverage_verdict: Any) -> dict:
    """The report dict from facts + verdicts (``verdicts``: variant -> ``mlstep.gates.VariantVerdicts``)."""
    report = {
        "source": str(facts.source),
        "model_type": facts.model_type,
        "num_heads": int(facts.num_heads),
        "hidden_size": int(facts.hidden_size),
        "options": dict(facts.options),
        "optimizer_seconds": round(float(facts.optimizer_seconds), 4),
        "mlflow": dict(facts.mlflow) if facts.mlflow is not None else None,
        "runtime": dict(facts.runtime) if facts.runtime is not None else None,
        "coverage": {"state": coverage_verdict.state, "reason": coverage_verdict.reason,
                     "blocks": {kind: {"detected": c.detected, "fused": c.fused, "misses": list(c.misses)}
                                for kind, c in facts.coverage.items()}},
        "notes": list(facts.notes),
        "forms": dict(facts.forms) if facts.forms is not None else None,
        "variants": {name: _variant(v, verdicts[name]) for name, v in facts.variants.items()},
    }
    return _clean(report)


def render(facts: RunFacts, verdicts: Mapping[str, Any], coverage_verdict: Any, directory: str | os.PathLike,
           fusion_log: Sequence | None = None) -> dict:
    """Write ``report.json`` and ``report.md`` into ``directory`` and return the dict (the one renderer).

    ``fusion_log`` (FusionLog list) adds the per-fusion log to the markdown (the CLI passes it with
    ``--verbose``)."""
    report = build(facts, verdicts, coverage_verdict)
    directory = Path(directory)
    try:
        (directory / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False) + "\n",
                                               encoding="utf-8")
        (directory / "report.md").write_text(render_markdown(report, fusion_log), encoding="utf-8")
    except OSError as err:
        raise OutputError(f"cannot write the report in {directory}: {err.strerror or err}") from err
    return report


def _variant(facts: VariantFacts, verdict) -> dict:
    parity = {"max_abs_diff": None, "passed": None, "worst_output": None, "worst_case": None, "cases": []}
    if facts.parity is not None:
        parity = {"max_abs_diff": float(facts.parity.max_abs_diff), "passed": bool(facts.parity.passed),
                  "worst_output": facts.parity.worst_output, "worst_case": facts.parity.worst_case,
                  "cases": list(facts.parity.cases)}
        if facts.parity.excluded:
            parity["not_compared"] = not_compared(facts.parity)
    latency = {"median": None, "p90": None, "p95": None, "baseline_median": None, "speedup": None,
               "speedup_interval": None}
    gate = facts.latency
    if gate is not None:
        latency.update(median=gate.median_ms, p90=gate.p90_ms, p95=gate.p95_ms, speedup=gate.speedup)
        if math.isfinite(gate.ratio_low) and math.isfinite(gate.ratio_high) and gate.ratio_low > 0:
            latency["speedup_interval"] = [round(1 / gate.ratio_high, 4), round(1 / gate.ratio_low, 4)]
        if facts.baseline is not None:
            latency["baseline_median"] = facts.baseline.median_ms
    latency = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in latency.items()}
    gates = (verdict.parity, verdict.latency, verdict.coverage)
    return {"path": facts.path, "fusions": dict(sorted(facts.fusions.items())), "parity": parity,
            "latency_ms": latency,
            "gate": {**{g.gate: g.state for g in gates}, "passed": verdict.passed,
                     "reasons": {g.gate: g.reason for g in gates}},
            "registered": facts.registered,
            "precision": _precision(facts.precision)}


def _precision(facts: Mapping[str, Any] | None) -> dict:
    facts = facts or {}
    return {"kept_float32": list(facts.get("kept_float32") or []), "note": facts.get("note")}


NOT_COMPARED = ("positions the attention mask marks as padding are not compared ({values} values; max difference "
                "{diff}): where such a position sees no key, ONNX Runtime's fused attention defines its row differently "
                "from the export; every padded position is masked for every real token, whose outputs are compared "
                "in full. `--exact-padding` refuses this fusion instead.")


def not_compared(parity) -> dict:
    """The parity values left out (ParityResult.excluded): which mask, how many, their largest difference, said
    plainly."""
    values = sum(count for count, _ in parity.excluded.values())
    diff = max((d for _, d in parity.excluded.values()), default=0.0)
    return {"mask": parity.unspecified_padding, "values": values,
            "max_abs_diff": diff if math.isfinite(diff) else None,
            "per_output": {name: {"values": count, "max_abs_diff": d if math.isfinite(d) else None}
                           for name, (count, d) in sorted(parity.excluded.items())},
            "reason": NOT_COMPARED.format(values=values, diff=f"{diff:.3e}")}


def gates_passed(report: Mapping) -> bool:
    return all(v["gate"]["passed"] for v in report["variants"].values())


def failed_gates(report: Mapping) -> list[str]:
    """One phrase per failed gate as the report records it (the coverage gate named once)."""
    out = []
    if (report.get("coverage") or {}).get("state") == "failed":
        out.append(f"coverage ({report['coverage']['reason']})")
    for name, v in report["variants"].items():
        out += [f"{name} {g} ({v['gate']['reasons'][g]})" for g in ("parity", "latency") if v["gate"][g] == "failed"]
    return out


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
        *_runtime_lines(report),
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
    lines += ["", "## Coverage", "", f"- gate: {report['coverage']['state']}"
              + (f" ({report['coverage']['reason']})" if report['coverage']['reason'] else "")]
    blocks = report["coverage"]["blocks"]
    if blocks:
        lines += [""] + _md_table(["block", "fused / detected", "unfused (why)"], [
            [kind, f"{b['fused']}/{b['detected']}", "; ".join(b["misses"]) or "-"] for kind, b in blocks.items()])
    lines += [f"- note: {note}" for note in report.get("notes") or []]
    lines += _forms_section(report)
    lines += _precision_lines(report)
    lines += ["", "## Parity", ""]
    lines += _md_table(["variant", "max |diff|", "worst output", "worst case", "cases", "result"], [
        [n, "-" if v["parity"]["max_abs_diff"] is None else f"{v['parity']['max_abs_diff']:.3e}",
         f"`{v['parity']['worst_output']}`" if v["parity"]["worst_output"] else "-",
         f"`{v['parity']['worst_case']}`" if v["parity"]["worst_case"] else "-", str(len(v["parity"]["cases"])),
         v["gate"]["parity"]]
        for n, v in report["variants"].items()])
    left_out = [f"- {n}: {v['parity']['not_compared']['reason']}" for n, v in report["variants"].items()
                if v["parity"].get("not_compared")]
    lines += [""] + left_out if left_out else []
    lines += ["", "## Latency (ms)", ""]
    lines += _md_table(["variant", "median", "p90", "p95", "baseline median", "speedup", "95% interval", "gate"], [
        [n, _num(v["latency_ms"]["median"]), _num(v["latency_ms"]["p90"]), _num(v["latency_ms"]["p95"]),
         _num(v["latency_ms"]["baseline_median"]),
         "-" if v["latency_ms"]["speedup"] is None else f"{v['latency_ms']['speedup']:.2f}x",
         "-" if not v["latency_ms"]["speedup_interval"] else "{:.2f}-{:.2f}x".format(*v["latency_ms"]["speedup_interval"]),
         v["gate"]["latency"]]
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


def _precision_lines(report: Mapping) -> list[str]:
    """``kept in float32: <ops> — <why, numbers>`` per variant whose conversion kept ops in float32."""
    lines = []
    for name, variant in report["variants"].items():
        precision = variant.get("precision") or {}
        for kept in precision.get("kept_float32") or []:
            chain = f" and {len(kept['ops'])} ops of its input chain ({', '.join(kept['ops'])})" if kept["ops"] else ""
            lines.append(f"- {name}: kept in float32: {kept['op']} `{kept['node']}`{chain} — its input reaches "
                         f"{kept['max_abs_input']:.4g} with a row spread down to {kept['min_row_spread']:.3g}: "
                         f"float16 would round it by {kept['fp16_error_ratio']:.3g} of the normalized peak "
                         f"(threshold {kept['threshold']:g})")
        if precision.get("note"):
            lines.append(f"- {name}: {precision['note']}")
    return ([""] + ["## Precision", ""] + lines) if lines else []


def runtime_line(report: Mapping) -> str | None:
    """Where parity and latency ran, with a ``--use-gpu`` fallback to the CPU and its cause (one line)."""
    facts = report.get("runtime")
    if not facts:
        return None
    where = ", ".join(facts.get("providers") or []) or "-"
    return f"{where}: {facts['gpu_fallback']}" if facts.get("gpu_fallback") else where


def _runtime_lines(report: Mapping) -> list[str]:
    line = runtime_line(report)
    if line is None:
        return []
    return [f"- runtime: **{line}**" if report["runtime"].get("gpu_fallback") else f"- runtime: {line}"]


def _forms_section(report: Mapping) -> list[str]:
    """The form selection: candidates, their parity and timings, the choice and the session settings measured."""
    forms = report.get("forms")
    if not forms:
        return []
    lines = ["", "## Form", "", f"- chosen: **{forms['chosen']}** ({forms['reason']})"]
    if forms["measured"]:
        session = forms["session"]
        lines.append(f"- measured on {forms['provider']}, session graph optimization "
                     f"{session['graph_optimization_level']} (ONNX Runtime's own fusions on every form), {session['intra_op_threads']} intra-op threads "
                     f"({session['threads_setting']}), interleaved rounds, median; {forms['seconds']:.2f} s")
    shapes = forms["shapes"]
    rows = []
    for c in forms["candidates"]:
        parity = c["parity"]
        rows.append([("**" + c["name"] + "**") if c["chosen"] else c["name"],
                     ", ".join(f"{op} {n}" for op, n in c["fusions"].items()) or "none",
                     "-" if parity["passed"] is None else
                     f"{'passed' if parity['passed'] else 'FAILED'} ({_num_e(parity['max_abs_diff'])})",
                     *[_num(c["median_ms"].get(s)) for s in shapes],
                     "-" if c["relative_to_fused"] is None else f"{c['relative_to_fused']:.3f}"])
    lines += [""] + _md_table(["form", "fused ops", "parity", *[f"{s} ms" for s in shapes], "time / fused"], rows)
    return lines


def _num_e(value) -> str:
    return "-" if value is None else f"{value:.1e}"


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
        status = f", {record['run_status']}" if record.get("run_status") else ""
        lines.append(f"- run: `{record['run_id']}` (experiment {record.get('experiment_id')}{status})")
    if record.get("registered_model"):
        lines.append(f"- registered model: `{record['registered_model']}`")
        rows = [[n, r.get("status", "-"), f"`{r['uri']}`" if r.get("uri") else "-",
                 f"`{r['alias']}`" if r.get("alias") and r.get("uri") else "-"]
                for n, r in (record.get("registrations") or {}).items()]
        if rows:
            lines += [""] + _md_table(["variant", "registration", "version", "alias"], rows)
    else:
        lines.append("- registration: off (local source without --register-as, or --no-register)")
    if record.get("removed_duplicates"):
        lines.append("- removed duplicate versions (made by retried or concurrent registrations): "
                     + ", ".join(f"`{uri}`" for uri in record["removed_duplicates"]))
    if record.get("ended_stale_runs"):
        lines.append("- ended runs that a dead mlstep step left RUNNING: "
                     + ", ".join(f"`{run}`" for run in record["ended_stale_runs"]))
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
