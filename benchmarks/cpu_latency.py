"""CPU latency, interleaved in one process: export / ONNX Runtime optimizer / Optimum O2, O3 / mlstep (issue 13).

Models (random weights from transformers configs, no hub download):
- bert-base (``BertConfig()``, eager attention), TorchScript export at opset 17 (the layout ONNX Runtime's
  optimizer fuses) at batch x sequence in {1x8, 1x128, 4x8, 4x128, 8x32};
- GPT-2 124M (``GPT2Config()``, GPT2LMHeadModel) with past, TorchScript export at opset 14, one new token on a
  past of {8, 128, 8, 128, 32} tokens at batch {1, 1, 4, 4, 8} (``--no-gpt2`` to skip).

Columns: the export; ``onnxruntime.transformers.optimizer.optimize_model`` (peer); Optimum's ORTOptimizer O2 and
O3 run in the pinned Optimum venv (``--optimum-python``; 'not installed' when it is absent); mlstep's fully fused
form; and **mlstep**, the form the step would register when the user gates that shape (``mlstep.forms``: every
form parity-checked, then timed interleaved at that shape with the step's own selection, and the fastest
passing form kept). Each cell is the median of ``--runs`` calls; all models of a shape run round-robin in this
process, CPUExecutionProvider, ``ORT_ENABLE_ALL``, ``--threads`` intra-op threads (default 2). Parity of every
column against the export (fp32 tolerance, batch 2, padding right and left) is printed under the table: a peer
that fails parity is timed anyway and marked.

    PYTHONPATH=. .venv/bin/python benchmarks/cpu_latency.py [--runs 20] [--threads 2] [--no-gpt2] [--layers 12]
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import compact, op_counts, short_error  # noqa: E402

from mlstep.gates import ratio_interval  # noqa: E402

BERT_SHAPES = ((1, 8), (1, 128), (4, 8), (4, 128), (8, 32))
GPT2_SHAPES = ((1, 8), (1, 128), (4, 8), (4, 128), (8, 32))     # batch x past, one new token
OPTIMUM_PYTHON = Path("/work/.venvs/optimum/bin/python")


def run_optimum(python: Path, src: Path, out_dir: Path, config_json: Path) -> dict:
    """level -> path or an error string, from benchmarks/_optimum_optimizer.py in Optimum's own venv."""
    import json

    if not python.exists():
        return {"O2": "not installed", "O3": "not installed"}
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1",
                                                                         "TRANSFORMERS_OFFLINE": "1"}
    script = Path(__file__).resolve().parent / "_optimum_optimizer.py"
    proc = subprocess.run([str(python), str(script), "O2,O3", str(src), str(out_dir), "--config", str(config_json)],
                          capture_output=True, text=True, timeout=1800, env=env)
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            made = json.loads(line)
            return {k: (f"error: {short_error(v['error'])}" if isinstance(v, dict) else Path(v))
                    for k, v in made.items()}
    return {"O2": f"error: {short_error(proc.stderr)}", "O3": f"error: {short_error(proc.stderr)}"}


def run_ort_optimizer(src: Path, out: Path, model_type: str, heads: int, hidden: int) -> Path | str:
    try:
        from onnxruntime.transformers.optimizer import optimize_model

        m = optimize_model(str(src), model_type, num_heads=heads, hidden_size=hidden)
        out.parent.mkdir(parents=True, exist_ok=True)
        m.save_model_to_file(str(out))
        return out
    except Exception as err:  # a peer's failure is a table cell
        return f"error: {short_error(str(err))}"


def bench_model(title: str, src: Path, peers: dict, shapes, work: Path, args, notes: list[str]) -> list[str]:
    """Parity of every column, the step's form selection per shape, the interleaved table."""
    from mlstep import forms
    from mlstep.bench.gates import has_past, shaped_feeds
    from mlstep.bench.latency import adapt_feeds, make_runner, open_session
    from mlstep.optimizer import OptimizeOptions, io, optimize
    from mlstep.validate.parity import check_parity, parity_cases, run_reference

    cpu = ["CPUExecutionProvider"]
    t0 = time.perf_counter()
    fused = optimize(io.load(src), OptimizeOptions(), source_dir=src.parent)
    candidates = forms.build_candidates(fused.model, src, OptimizeOptions(), work / "forms")
    t_build = time.perf_counter() - t0
    source_model = io.load(src)
    cases = parity_cases(source_model, batch=2, sequence=8)
    reference = run_reference(src, cases, cpu)
    select = forms.SelectSettings(threads=args.threads, budget_s=args.select_budget)
    parity = {c.name: check_parity(src, c.path, "fp32", cases, cpu, reference) for c in candidates}
    passing = [c for c in candidates if parity[c.name].passed]
    models = {"export": src}
    for name, value in peers.items():
        if isinstance(value, Path):
            models[name] = value
            parity[name] = check_parity(src, value, "fp32", cases, cpu, reference)
    models["mlstep fused"] = candidates[0].path
    by_form = {c.name: c.path for c in candidates}
    for c in candidates[1:]:
        models[f"form {c.name}"] = c.path
    past = has_past(source_model)
    sessions = {name: open_session(path, cpu, args.threads) for name, path in models.items()}
    rows, choices = [], {}
    for batch, seq in shapes:
        # the step's selection at this gated shape (its own interleaved measurement, its own budget)
        timings, _, _ = forms.measure(passing, [(batch, seq)], cpu, select, feeds_model=source_model)
        chosen, _ = forms.choose([c.name for c in candidates], parity, timings)
        choices[(batch, seq)] = chosen
        feeds, _ = shaped_feeds(source_model, batch, seq)
        timed = [n for n in sessions if not n.startswith("form ") or n == f"form {chosen}"]  # the chosen form only
        runners = {name: make_runner(sessions[name], adapt_feeds(sessions[name], feeds)) for name in timed}
        for run in runners.values():
            for _ in range(args.warmup):
                run()
        times = {name: [] for name in runners}
        names = list(runners)
        for i in range(args.runs):
            for name in names[i % len(names):] + names[:i % len(names)]:
                t = time.perf_counter()
                runners[name]()
                times[name].append((time.perf_counter() - t) * 1e3)
        med = {name: statistics.median(v) for name, v in times.items()}
        times["mlstep"] = times["mlstep fused"] if chosen == forms.FUSED else times[f"form {chosen}"]
        med["mlstep"] = statistics.median(times["mlstep"])
        # call i of every model ran in the same round: paired ratios, the latency gate's 95% interval
        med["_vs_export"] = ratio_interval([[x] for x in times["export"]], [[y] for y in times["mlstep"]])
        if "ORT optimizer" in times:
            med["_vs_ort"] = ratio_interval([[x] for x in times["ORT optimizer"]], [[y] for y in times["mlstep"]])
        rows.append(((batch, seq), med))
        print(f"  {title} {batch}x{seq}: " + ", ".join(f"{k} {v:.1f}" for k, v in med.items() if k[0] != "_")
              + f" -> {chosen}",
              file=sys.stderr, flush=True)

    peer_cols = list(peers)
    shape_head = "batch x past" if past else "batch x seq"
    head = ["export"] + peer_cols + ["mlstep fused", "mlstep (chosen form)", "form", "mlstep / export [95%]",
                                     "mlstep vs ORT opt [95%]"]
    lines = [f"\n### {title}\n", f"| {shape_head} | " + " | ".join(head) + " |", "|---|" + "--:|" * (len(head) - 3)
             + "---|--:|--:|"]
    ratios, vs_ort = [], []
    for (batch, seq), med in rows:
        cells = [f"{med['export']:.1f}"]
        for p in peer_cols:
            cells.append(f"{med[p]:.1f}" if p in med else str(peers[p]).replace("|", "/")[:40])
        ratios.append(med["_vs_export"].speedup)
        vs = _speedup_cell(med["_vs_ort"]) if "_vs_ort" in med else "-"
        if "_vs_ort" in med:
            vs_ort.append(med["_vs_ort"].speedup)
        cells += [f"{med['mlstep fused']:.1f}", f"**{med['mlstep']:.1f}**", choices[(batch, seq)],
                  _speedup_cell(med["_vs_export"]), vs]
        lines.append(f"| {batch} x {seq} | " + " | ".join(cells) + " |")
    geo = math.exp(sum(map(math.log, ratios)) / len(ratios))
    lines.append("speed-up = the other's time / mlstep's, geometric mean of the per-round ratios with its 95% interval; "
                 "*slower* only when the whole interval is below 1x, *within noise* when it contains 1x")
    lines.append(f"\ngeomean mlstep / export {geo:.2f}x" + (
        f", mlstep / ORT optimizer {math.exp(sum(map(math.log, vs_ort)) / len(vs_ort)):.2f}x" if vs_ort else ""))
    lines.append("fused ops: " + "; ".join(f"{n}: {compact(op_counts(p))}" for n, p in models.items()))
    lines.append("parity vs export (fp32 tolerance; batch 2, no/right/left padding"
                 + (", past 0/1/17" if past else "") + "): "
                 + "; ".join(f"{n} {'pass' if r.passed else 'FAIL'} ({r.max_abs_diff:.1e})"
                             for n, r in parity.items()))
    lines.append(f"forms built in {t_build:.1f} s (mlstep optimize x{len(candidates)} incl. writes); "
                 f"form {'/'.join(by_form)}")
    return lines


def _speedup_cell(est) -> str:
    """'1.03x [0.98, 1.08] within noise' from a time-ratio estimate (mlstep / other)."""
    low, high = 1.0 / est.high, 1.0 / est.low
    verdict = "faster" if low > 1.0 else "*slower*" if high < 1.0 else "within noise"
    return f"{est.speedup:.2f}x [{low:.2f}, {high:.2f}] {verdict}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads (0 = ORT default)")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--select-budget", type=float, default=6.0, help="seconds of the step's form selection per shape")
    ap.add_argument("--no-gpt2", action="store_true")
    ap.add_argument("--no-bert", action="store_true")
    ap.add_argument("--optimum-python", type=Path, default=OPTIMUM_PYTHON)
    args = ap.parse_args(argv)

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import onnxruntime as ort
    import transformers as tf

    from mlstep.export import build_gpt2, build_model, export_encoder, export_gpt2

    work = Path(tempfile.mkdtemp(prefix="mlstep-cpu-latency-", dir="/tmp"))
    out: list[str] = []
    notes: list[str] = []
    try:
        models = []
        if not args.no_bert:
            cfg = tf.BertConfig(num_hidden_layers=args.layers)
            models.append(("bert", cfg, lambda cfg, src: export_encoder(build_model(cfg), src, "torchscript", 17,
                                                                         external_data=False),
                           cfg.num_attention_heads, BERT_SHAPES,
                           f"bert-base ({args.layers} layers, hidden 768), TorchScript 17, eager"))
        if not args.no_gpt2:
            cfg = tf.GPT2Config(n_layer=args.layers)
            models.append(("gpt2", cfg, lambda cfg, src: export_gpt2(build_gpt2(cfg), src, "torchscript", 14,
                                                                      with_past=True),
                           cfg.n_head, GPT2_SHAPES,
                           f"GPT-2 124M ({args.layers} layers, n_embd 768) with past, TorchScript 14, one new token"))
        for name, cfg, export, heads, shapes, title in models:
            cfg._attn_implementation = "eager"
            src = work / name / "model.onnx"
            t = time.perf_counter()
            export(cfg, src)
            cfg.to_json_file(str(work / name / "config.json"))
            print(f"{name} export {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
            peers = {"ORT optimizer": run_ort_optimizer(src, work / f"{name}-ort" / "model.onnx", name, heads,
                                                        cfg.hidden_size)}
            optimum = run_optimum(args.optimum_python, src, work / f"{name}-optimum", work / name / "config.json")
            peers.update({f"Optimum {k}": v for k, v in optimum.items()})
            out += bench_model(title, src, peers, shapes, work / f"{name}-work", args, notes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    cpu = "CPUExecutionProvider"
    print(f"onnxruntime {ort.__version__}, {cpu}, ORT_ENABLE_ALL, {args.threads} intra-op threads, median ms of "
          f"{args.runs} round-robin calls after {args.warmup} warm-up; random weights; load average at the end "
          f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
