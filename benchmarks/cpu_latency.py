"""CPU latency (issue 2, item 10d): mlstep fp32 variant vs the unoptimized model.

A random-weight BERT (default 4 layers, hidden 256, 4 heads, intermediate 1024; --bert-base for
BertConfig() defaults) exported with the dynamo exporter (or --exporter torchscript), optimized with
mlstep's library API. Both models run in this process on CPUExecutionProvider with ORT's default session
options; per cell: warm-up, then the median of N runs, baseline and fused interleaved.

    .venv/bin/python benchmarks/cpu_latency.py [--runs 50] [--bert-base] [--exporter torchscript]
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

BATCHES = (1, 4)
SEQUENCES = (8, 32, 128)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--bert-base", action="store_true")
    ap.add_argument("--exporter", default="dynamo", choices=("dynamo", "torchscript"))
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0 = ORT default)")
    args = ap.parse_args(argv)

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    import numpy as np
    import onnxruntime as ort
    import transformers as tf

    from mlstep.export import build_model, export_encoder
    from mlstep.optimizer import OptimizeOptions, optimize_file
    from mlstep.optimizer.io import save

    if args.bert_base:
        cfg = tf.BertConfig()
    else:
        cfg = tf.BertConfig(num_hidden_layers=args.layers, hidden_size=args.hidden,
                            num_attention_heads=args.heads, intermediate_size=args.intermediate)
    cfg._attn_implementation = "sdpa"
    work = Path(tempfile.mkdtemp(prefix="mlstep-latency-", dir="/tmp"))
    try:
        src = work / "src" / "model.onnx"
        export_encoder(build_model(cfg), src, args.exporter, 18 if args.exporter == "dynamo" else 17,
                       external_data=False)  # < 2 GB; see report: io.save drops external data below 1 GiB
        r = optimize_file(src, OptimizeOptions())
        fused = save(r.model, work / "fp32" / "model.onnx")

        so = ort.SessionOptions()  # defaults (ORT_ENABLE_ALL)
        if args.threads:
            so.intra_op_num_threads = args.threads
        sessions = {name: ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
                    for name, p in (("baseline", src), ("fused", fused))}
        rng = np.random.default_rng(0)
        rows = []
        for batch in BATCHES:
            for seq in SEQUENCES:
                feeds_all = {"input_ids": rng.integers(3, min(cfg.vocab_size, 1000), (batch, seq), dtype=np.int64),
                             "attention_mask": np.ones((batch, seq), np.int64),
                             "token_type_ids": np.zeros((batch, seq), np.int64)}
                feeds = {name: {i.name: feeds_all[i.name] for i in s.get_inputs()} for name, s in sessions.items()}
                for name, s in sessions.items():
                    for _ in range(args.warmup):
                        s.run(None, feeds[name])
                times = {name: [] for name in sessions}
                for _ in range(args.runs):
                    for name, s in sessions.items():
                        t = time.perf_counter()
                        s.run(None, feeds[name])
                        times[name].append((time.perf_counter() - t) * 1e3)
                b = statistics.median(times["baseline"])
                f = statistics.median(times["fused"])
                rows.append((batch, seq, b, f, b / f))
        desc = ("bert-base (12 layers, hidden 768, 12 heads)" if args.bert_base else
                f"BERT {args.layers} layers, hidden {args.hidden}, {args.heads} heads, ffn {args.intermediate}")
        print(f"{desc}; {args.exporter} export; mlstep fused: {compact(r.fusions)}; "
              f"ORT {ort.__version__}, default session options, median of {args.runs} after {args.warmup} warm-up")
        print("| batch | seq | baseline ms | mlstep fp32 ms | speedup |")
        print("|---|---|---|---|---|")
        for batch, seq, b, f, sp in rows:
            print(f"| {batch} | {seq} | {b:.3f} | {f:.3f} | {sp:.2f}x{'  (SLOWER)' if sp < 1 else ''} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
