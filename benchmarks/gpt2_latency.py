"""GPT-2 generation-step latency (issue 3, item 4): one new token with past state.

GPT2LMHeadModel with GPT2Config() defaults (124M: 12 layers, n_embd 768, 12 heads), random weights,
exported with past (dynamo 18 by default), optimized with mlstep's library API (fp32) and converted to fp16
(mlstep.precision.to_fp16, keep_io_types like ``mlstep optimize``). Per cell (batch x past length): inputs
input_ids/position_ids [batch, 1], attention_mask [batch, past + 1], past_key/value_i [batch, 12, past, 64];
baseline, mlstep fp32 and mlstep fp16 run round-robin in this process on CPUExecutionProvider with ORT's
default session options (or CUDA with IO binding when --cuda and it loads); median ms.
fp16 on CPU has few fp16 kernels (ORT inserts casts / falls back): it is measured, not expected to win.

    .venv/bin/python benchmarks/gpt2_latency.py [--repeat 20] [--fp16-repeat 5] [--layers 12] [--exporter torchscript]
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _common import compact  # noqa: E402

BATCHES = (1, 8, 32)
PASTS = (4, 32, 128)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per cell for baseline and fp32")
    ap.add_argument("--fp16-repeat", type=int, default=5, help="timed runs per cell for fp16 (slow on CPU)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    ap.add_argument("--no-fp16", action="store_true")
    ap.add_argument("--cuda", action="store_true", help="CUDAExecutionProvider with IO binding when it loads")
    args = ap.parse_args(argv)

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    import numpy as np
    import onnx_ir as ir
    import onnxruntime as ort
    import transformers as tf

    from mlstep.bench.latency import make_runner, open_session, adapt_feeds
    from mlstep.export import build_gpt2, export_gpt2
    from mlstep.optimizer import OptimizeOptions, optimize_file
    from mlstep.optimizer.io import save
    from mlstep.precision import to_fp16
    from mlstep.validate import check_parity, providers, synthesize_inputs

    cfg = tf.GPT2Config(n_layer=args.layers)
    cfg._attn_implementation = "sdpa"
    prov = providers(args.cuda)
    work = Path(tempfile.mkdtemp(prefix="mlstep-gpt2-latency-", dir="/tmp"))
    try:
        t0 = time.perf_counter()
        src = work / "src" / "model.onnx"
        export_gpt2(build_gpt2(cfg), src, args.exporter, 18 if args.exporter == "dynamo" else 14, with_past=True)
        t_export = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = optimize_file(src, OptimizeOptions())
        t_opt = time.perf_counter() - t0
        paths = {"baseline": src, "fp32": save(r.model, work / "fp32" / "model.onnx")}
        if not args.no_fp16:
            paths["fp16"] = save(to_fp16(r.model, keep_io_types=True), work / "fp16" / "model.onnx")
        print(f"export {t_export:.0f} s ({args.exporter}), mlstep optimize {t_opt:.1f} s: {compact(r.fusions)}",
              file=sys.stderr, flush=True)

        # parity of what is timed: batch 2, one new token, past 4, no/right/left padding, every output
        cases = synthesize_inputs(ir.load(src), batch=2, sequence=1, past_sequence=4)
        parity = {name: check_parity(src, p, name, cases, providers=prov) for name, p in paths.items()
                  if name != "baseline"}

        sessions = {name: open_session(p, prov) for name, p in paths.items()}
        rng = np.random.default_rng(0)
        heads, head = cfg.n_head, cfg.n_embd // cfg.n_head
        rows = []
        for batch in BATCHES:
            for past in PASTS:
                feeds = {"input_ids": rng.integers(0, cfg.vocab_size, (batch, 1), dtype=np.int64),
                         "position_ids": np.full((batch, 1), past, np.int64),
                         "attention_mask": np.ones((batch, past + 1), np.int64)}
                for i in range(cfg.n_layer):
                    for kind in ("key", "value"):
                        feeds[f"past_{kind}_{i}"] = rng.standard_normal((batch, heads, past, head), np.float32)
                runners = {name: make_runner(s, adapt_feeds(s, feeds)) for name, s in sessions.items()}
                for run in runners.values():
                    for _ in range(args.warmup):
                        run()
                times = {name: [] for name in runners}
                for i in range(max(args.repeat, args.fp16_repeat)):
                    for name, run in runners.items():
                        if i >= (args.fp16_repeat if name == "fp16" else args.repeat):
                            continue
                        t = time.perf_counter()
                        run()
                        times[name].append((time.perf_counter() - t) * 1e3)
                med = {name: statistics.median(v) for name, v in times.items()}
                rows.append((batch, past, med))
                print(f"  b{batch} past{past}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in med.items()),
                      file=sys.stderr, flush=True)

        device = sessions["baseline"].get_providers()[0]
        print(f"GPT2LMHeadModel {cfg.n_layer} layers, n_embd {cfg.n_embd}, {cfg.n_head} heads (random weights), "
              f"{args.exporter} export with past; mlstep: {compact(r.fusions)}; ORT {ort.__version__} {device}, "
              f"default session options; one new token; median of {args.repeat} (fp16: {args.fp16_repeat}) "
              f"after {args.warmup} warm-up, round-robin")
        print("parity (batch 2, seq 1, past 4, no/right/left padding, logits + every present): " +
              "; ".join(f"{k} max|diff| {v.max_abs_diff:.1e} {'pass' if v.passed else 'FAIL'}"
                        for k, v in parity.items()))
        has16 = "fp16" in paths
        print("| batch | past | baseline ms | mlstep fp32 ms | fp32 speedup |"
              + (" mlstep fp16 ms | fp16 speedup |" if has16 else ""))
        print("|---|---|---|---|---|" + ("---|---|" if has16 else ""))
        for batch, past, med in rows:
            line = f"| {batch} | {past} | {med['baseline']:.2f} | {med['fp32']:.2f} | " \
                   f"{med['baseline'] / med['fp32']:.2f}x |"
            if has16:
                line += f" {med['fp16']:.2f} | {med['baseline'] / med['fp16']:.2f}x |"
            print(line)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
