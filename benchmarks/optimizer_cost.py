"""Optimizer cost (issue 2, item 10b; issue 3, item 5): a bert-base-sized (default) or gpt2-medium-sized
(``--model gpt2-medium``: GPT2LMHeadModel with past, n_embd 1024, 24 layers, 16 heads) dynamo export with
external data.

Wall time and peak RSS of ``mlstep optimize --precision fp32 --skip-validation --skip-benchmark`` vs ONNX
Runtime's transformers optimizer (optimize_model + save_model_to_file with external data), each in a fresh
child process measured with GNU time -v (or RUSAGE_CHILDREN). Target: mlstep <= 1/2 ORT's time and <= 1/4 its
peak RSS.

    .venv/bin/python benchmarks/optimizer_cost.py [--repeat 2] [--breakdown] [--cprofile 25] [--keep DIR]
    .venv/bin/python benchmarks/optimizer_cost.py --model gpt2-medium [--repeat 1]
"""
from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import PY, ROOT, check_loads, dir_size, export_bert, measure_child, mlstep_cli, short_error  # noqa: E402

ORT_CODE = (
    "import logging, sys; logging.disable(logging.WARNING);"
    "from onnxruntime.transformers import optimizer;"
    "m = optimizer.optimize_model(sys.argv[1], model_type='%s', num_heads=%d, hidden_size=%d, opt_level=0);"
    "m.save_model_to_file(sys.argv[2], use_external_data_format=True);"
    "print(m.get_fused_operator_statistics())"
)


def measure(model: Path, work: Path, heads: int, hidden: int, repeat: int, which=("mlstep", "ort"),
            model_type: str = "bert") -> dict:
    """{tool: {"wall_s": [...], "rss_mib": [...], "error": str|None}}"""
    out: dict = {}
    for tool in which:
        runs = {"wall_s": [], "rss_mib": [], "error": None, "loads": "-", "out_mib": 0.0}
        for i in range(repeat):
            dest = work / f"{tool}-out-{i}"
            shutil.rmtree(dest, ignore_errors=True)
            if tool == "mlstep":
                cmd = [mlstep_cli(), "optimize", str(model), "-o", str(dest), "--precision", "fp32",
                       "--skip-validation", "--skip-benchmark"]
            else:
                dest.mkdir(parents=True)
                cmd = [PY, "-c", ORT_CODE % (model_type, heads, hidden), str(model), str(dest / "model.onnx")]
            r = measure_child(cmd)
            if i == 0 and r["rc"] == 0:  # outside the timing: is the written model usable?
                written = dest / ("fp32/model.onnx" if tool == "mlstep" else "model.onnx")
                runs["loads"] = check_loads(written)
                runs["out_mib"] = dir_size(written.parent) / 2**20
            shutil.rmtree(dest, ignore_errors=True)
            if r["rc"] != 0:
                runs["error"] = short_error(r["stderr"] or r["stdout"])
                break
            runs["wall_s"].append(r["wall_s"])
            runs["rss_mib"].append(r["rss_mib"])
        out[tool] = runs
    return out


def fmt(runs: dict) -> tuple[str, str]:
    if runs["error"]:
        return f"error: {runs['error']}", "-"
    return f"{statistics.median(runs['wall_s']):.1f}", f"{max(runs['rss_mib']):.0f}"


def export_gpt2_medium(out: Path, timeout: float = 3600) -> dict:
    """GPT2LMHeadModel (n_embd 1024, 24 layers, 16 heads), random weights, with past: dynamo 18 with external
    data, in a fresh child process."""
    code = (
        "import sys, logging, warnings; sys.path.insert(0, %r); logging.disable(logging.WARNING);"
        "warnings.simplefilter('ignore');"
        "import transformers as tf; from mlstep.export import build_gpt2, export_gpt2;"
        "cfg = tf.GPT2Config(n_embd=1024, n_layer=24, n_head=16); cfg._attn_implementation = 'sdpa';"
        "export_gpt2(build_gpt2(cfg), %r, 'dynamo', 18, with_past=True, external_data=True)"
    ) % (str(ROOT), str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    return measure_child([PY, "-c", code], timeout=timeout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=2, help="runs per tool (median time, max RSS)")
    ap.add_argument("--breakdown", action="store_true", help="also print mlstep's per-step time / RSS")
    ap.add_argument("--cprofile", type=int, default=0, help="with --breakdown: top-N cProfile functions")
    ap.add_argument("--save-external", action="store_true",
                    help="with --breakdown: save with all weights as external data (what a fixed io.save costs)")
    ap.add_argument("--model", help="bert-base (default), gpt2-medium, or the path of an existing export "
                    "(bert-base sized)")
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="mlstep-cost-", dir="/tmp"))
    try:
        preset = args.model or "bert-base"
        model_type, heads, hidden = ("gpt2", 16, 1024) if preset == "gpt2-medium" else ("bert", 12, 768)
        if preset == "gpt2-medium":
            model = work / "gpt2-medium" / "model.onnx"
            e = export_gpt2_medium(model)
            if e["rc"] != 0:
                print("export failed:", short_error(e["stderr"]))
                return 1
            print(f"exported gpt2-medium (GPT2LMHeadModel with past, dynamo 18, external data) in {e['wall_s']:.0f} s, "
                  f"peak RSS {e['rss_mib']:.0f} MiB, {dir_size(model.parent) / 2**20:.0f} MiB on disk",
                  file=sys.stderr)
        elif args.model and args.model != "bert-base":
            model = Path(args.model)
        else:
            model = work / "bert-base" / "model.onnx"
            e = export_bert(model)
            if e["rc"] != 0:
                print("export failed:", short_error(e["stderr"]))
                return 1
            print(f"exported bert-base (dynamo 18, external data) in {e['wall_s']:.0f} s, "
                  f"peak RSS {e['rss_mib']:.0f} MiB, {dir_size(model.parent) / 2**20:.0f} MiB on disk",
                  file=sys.stderr)
        res = measure(model, work, heads, hidden, args.repeat, model_type=model_type)
        print(f"model: {preset} ({model_type}, {heads} heads, hidden {hidden}), dynamo 18 export with external data")
        m_t, m_r = fmt(res["mlstep"])
        o_t, o_r = fmt(res["ort"])
        lines = ["| tool | wall s (median of %d) | peak RSS MiB (max) | runs: s / MiB | output MiB | "
                 "output loads in ORT |" % args.repeat, "|---|---|---|---|---|---|"]
        for tool, t, r in (("mlstep optimize (CLI, fp32, skip validation+benchmark)", m_t, m_r),
                           (f"ORT transformers optimizer (model_type {model_type}, opt_level 0)", o_t, o_r)):
            runs = res["mlstep" if tool.startswith("mlstep") else "ort"]
            detail = ", ".join(f"{w:.1f}/{m:.0f}" for w, m in zip(runs["wall_s"], runs["rss_mib"]))
            lines.append(f"| {tool} | {t} | {r} | {detail} | {runs['out_mib']:.0f} | {runs['loads']} |")
        if not res["mlstep"]["error"] and not res["ort"]["error"]:
            tr = statistics.median(res["mlstep"]["wall_s"]) / statistics.median(res["ort"]["wall_s"])
            rr = max(res["mlstep"]["rss_mib"]) / max(res["ort"]["rss_mib"])
            lines += ["", f"mlstep/ORT time ratio {tr:.2f} (target <= 0.50: {'met' if tr <= 0.5 else 'MISSED'}); "
                      f"peak RSS ratio {rr:.2f} (target <= 0.25: {'met' if rr <= 0.25 else 'MISSED'})"]
        # Fixed cost of the interpreter + imports, for context.
        base = measure_child([mlstep_cli(), "--help"])
        lines.append(f"mlstep CLI startup alone (`mlstep --help`): {base['wall_s']:.1f} s, "
                     f"{base['rss_mib']:.0f} MiB")
        print("\n".join(lines))
        if args.breakdown:
            cmd = [PY, str(ROOT / "benchmarks" / "_breakdown.py"), str(model), str(work / "bd" / "model.onnx")]
            if args.cprofile:
                cmd += ["--cprofile", str(args.cprofile)]
            if args.save_external:
                cmd += ["--save-external"]
            r = measure_child(cmd)
            # (the child resets its peak-RSS counter per step, so its overall peak is the max step peak)
            print("\nmlstep pipeline breakdown (library, in one child, %.1f s wall incl. imports):" % r["wall_s"])
            print(r["stdout"] if r["rc"] == 0 else "error: " + short_error(r["stderr"]))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
