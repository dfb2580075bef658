"""Scaling: mlstep optimize time and peak RSS vs depth (issue 13 item 4: GPT-2-large width with past; issue 2:
BERT hidden 1024).

``--gpt2`` (issue 13): GPT2LMHeadModel with past at GPT-2-large width (n_embd 1280, 20 heads), dynamo 18 with
external data, at ``--layers`` (GPT-2-large is 36 layers, ~3.1 GB; on a 2-core machine the export of the full
model is the slow part, so the trend is shown at 6/12/24 layers by default and extrapolated to 36).

Default (issue 2):
BERT with hidden 1024, 16 heads, intermediate 4096 at 12, 24 and 48 layers (the 48-layer export is ~2.4 GB),
dynamo exporter with external data, random weights. Each model is exported in a fresh child, optimized by
``mlstep optimize --precision fp32 --skip-validation --skip-benchmark`` in a fresh child (GNU time -v), then
deleted. Targets: time and peak RSS grow linearly; the ~2.4 GB model under 1.5 GB peak RSS.

    .venv/bin/python benchmarks/scaling.py [--layers 12,24,48] [--breakdown 48]
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (PY, ROOT, check_loads, dir_size, export_bert, export_gpt2_past, measure_child,  # noqa: E402
                     mlstep_cli, short_error)


_OPTIMIZE_ONLY = ("import sys; sys.path.insert(0, %r); from mlstep.optimizer import optimize_file; "
                  "from mlstep.optimizer.io import save; save(optimize_file(sys.argv[1]).model, sys.argv[2])"
                  % str(ROOT))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpt2", action="store_true", help="GPT-2 with past at GPT-2-large width (issue 13)")
    ap.add_argument("--layers", default=None, help="default 12,24,48 (BERT) or 6,12,24 (--gpt2)")
    ap.add_argument("--hidden", type=int, default=None, help="default 1024 (BERT) or 1280 (--gpt2)")
    ap.add_argument("--heads", type=int, default=None, help="default 16 (BERT) or 20 (--gpt2)")
    ap.add_argument("--intermediate", type=int, default=4096)
    ap.add_argument("--breakdown", type=int, default=0, help="print mlstep's per-step breakdown at this depth")
    ap.add_argument("--export-timeout", type=float, default=1800)
    args = ap.parse_args(argv)
    args.layers = args.layers or ("6,12,24" if args.gpt2 else "12,24,48")
    args.hidden = args.hidden or (1280 if args.gpt2 else 1024)
    args.heads = args.heads or (20 if args.gpt2 else 16)

    rows = []
    optimizer_only: dict[int, str] = {}
    for layers in [int(x) for x in args.layers.split(",")]:
        work = Path(tempfile.mkdtemp(prefix=f"mlstep-scale{layers}-", dir="/tmp"))
        try:
            model = work / "src" / "model.onnx"
            try:
                e = (export_gpt2_past(model, layers, args.hidden, args.heads, timeout=args.export_timeout)
                     if args.gpt2 else export_bert(model, layers, args.hidden, args.heads, args.intermediate,
                                                   timeout=args.export_timeout))
            except Exception as err:  # timeout
                rows.append((layers, "-", f"export: {short_error(str(err))}", "-", "-", "-", "-", "-"))
                continue
            if e["rc"] != 0:
                rows.append((layers, "-", f"export failed: {short_error(e['stderr'])}", "-", "-", "-", "-", "-"))
                continue
            size = dir_size(model.parent) / 2**20
            print(f"[{layers} layers] exported {size:.0f} MiB in {e['wall_s']:.0f} s (peak {e['rss_mib']:.0f} MiB)",
                  file=sys.stderr, flush=True)
            out = work / "opt"
            r = measure_child([mlstep_cli(), "optimize", str(model), "-o", str(out), "--precision", "fp32",
                               "--skip-validation", "--skip-benchmark"])
            if r["rc"] != 0:
                rows.append((layers, f"{size:.0f}", f"error: {short_error(r['stderr'])}", "-", "-",
                             f"{e['wall_s']:.0f}", "-", "-"))
            else:
                written = out / "fp32" / "model.onnx"
                rows.append((layers, f"{size:.0f}", f"{r['wall_s']:.1f}", f"{r['rss_mib']:.0f}",
                             f"{r['rss_mib'] / size:.2f}", f"{e['wall_s']:.0f} s / {e['rss_mib']:.0f} MiB",
                             f"{dir_size(written.parent) / 2**20:.0f}", check_loads(written)))
            print(f"[{layers} layers] mlstep {r['wall_s']:.1f} s, {r['rss_mib']:.0f} MiB", file=sys.stderr,
                  flush=True)
            # the optimizer alone (load, fuse, save; no ONNX Runtime session): what the step's ORT load checks add
            opt = measure_child([PY, "-c", _OPTIMIZE_ONLY, str(model), str(work / "only" / "model.onnx")])
            optimizer_only[layers] = (f"{opt['wall_s']:.1f} s / {opt['rss_mib']:.0f} MiB" if opt["rc"] == 0
                                      else f"error: {short_error(opt['stderr'])}")
            shutil.rmtree(work / "only", ignore_errors=True)
            print(f"[{layers} layers] optimizer only {optimizer_only[layers]}", file=sys.stderr, flush=True)
            if args.breakdown == layers:
                shutil.rmtree(out, ignore_errors=True)
                b = measure_child([PY, str(ROOT / "benchmarks" / "_breakdown.py"), str(model),
                                   str(work / "bd" / "model.onnx")])
                print(f"\nbreakdown at {layers} layers:\n" + (b["stdout"] if b["rc"] == 0 else short_error(b["stderr"])))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    lines = ["| layers | model MiB (onnx + data) | mlstep wall s | mlstep peak RSS MiB | RSS / model size | "
             "export (time / peak RSS) | output MiB | output loads in ORT |", "|---|---|---|---|---|---|---|---|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    ok = [r for r in rows if r[3] != "-"]
    if len(ok) >= 2:
        (l0, _, t0, m0, *_), (l1, _, t1, m1, *_) = ok[0], ok[-1]
        k = int(l1) / int(l0)
        lines.append(f"\n{l0}->{l1} layers (x{k:.0f}): time x{float(t1) / float(t0):.2f}, "
                     f"peak RSS x{float(m1) / float(m0):.2f}")
    if optimizer_only:
        lines.append("\noptimizer alone (load, fuse, save; no ONNX Runtime session), wall / peak RSS: "
                     + "; ".join(f"{k} layers {v}" for k, v in optimizer_only.items()))
    for r in ok:
        if float(r[1]) > 2000:
            lines.append(f"{r[0]} layers ({float(r[1]) / 1024:.2f} GiB): peak RSS {float(r[3]) / 1024:.2f} GiB "
                         f"(target < 1.5 GB: {'met' if float(r[3]) * 2**20 < 1.5e9 else 'MISSED'})")
    if len(ok) >= 2:
        # least squares: time and RSS ~ a + b * layers, extrapolated to the largest asked-for depth and to 36
        xs = [int(r[0]) for r in ok]
        for label, col in (("wall s", 2), ("peak RSS MiB", 3)):
            ys = [float(r[col]) for r in ok]
            mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
            b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
            a = my - b * mx
            fit = ", ".join(f"{x}: {a + b * x:.1f} (measured {y:.1f})" for x, y in zip(xs, ys))
            lines.append(f"{label} ~ {a:.1f} + {b:.2f} x layers [{fit}]; at 36 layers: {a + b * 36:.1f}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
