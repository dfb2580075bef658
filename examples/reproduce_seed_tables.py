"""Reproduce the seed's latency tables on this machine: bert-base (``BertConfig()``) over batch x sequence
length, and gpt2 (``GPT2Config()``) with past over batch x past length (one new token), random weights.

Each model is exported with torch's dynamo exporter, then ``mlstep.bench.grid.run_grid`` optimizes it in
process (fp32 and fp16 variants, the same code as ``mlstep optimize``) and times every engine. The tables
have the seed's layout: rows engine / precision / batch, columns ``s=`` (bert) and ``past=`` (gpt2).
bert-base is also timed in PyTorch eager (``torch (eager)`` rows).

    python examples/reproduce_seed_tables.py            # the seed's grid (minutes on a CPU)
    python examples/reproduce_seed_tables.py --quick    # a small grid
    python examples/reproduce_seed_tables.py --use-gpu  # CUDA with IO binding, when it loads

Offline: nothing is downloaded.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FULL = dict(bert_batches=(1, 4, 16), bert_seqs=(8, 16, 32, 64, 128, 256), gpt2_batches=(1, 4, 16),
            gpt2_pasts=(8, 16, 32, 64, 128, 256), warmup=5, repeat=30)
QUICK = dict(bert_batches=(1, 4), bert_seqs=(8, 32, 128), gpt2_batches=(1, 4), gpt2_pasts=(8, 32, 128),
             warmup=2, repeat=10)


def export_bert(path: Path, config_json: Path) -> Path:
    from transformers import BertConfig

    from mlstep.export import build_model, export_encoder

    config = BertConfig()
    config._attn_implementation = "sdpa"
    config_json.write_text(json.dumps(config.to_dict()))
    return export_encoder(build_model(config), path, exporter="dynamo", opset=18)


def export_gpt2_with_past(path: Path) -> Path:
    from transformers import GPT2Config

    from mlstep.export import build_gpt2, export_gpt2

    config = GPT2Config()
    config._attn_implementation = "sdpa"
    return export_gpt2(build_gpt2(config, lm_head=True), path, exporter="dynamo", opset=18, with_past=True)


def print_table(title: str, result) -> None:
    header, rows = result.table()
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).ljust(w) if i < 2 else str(c).rjust(w)  # noqa: E731
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    print(f"\n{title}")
    print(line(header))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print(line(row))
    print(result.caption(), flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small grid: batch 1,4; s/past 8,32,128; 10 calls")
    parser.add_argument("--use-gpu", action="store_true", help="time on CUDA (IO binding) when it loads")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: the runtimes' defaults)")
    parser.add_argument("--only", choices=("bert", "gpt2"), help="one table only")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager rows (bert)")
    parser.add_argument("--workdir", type=Path, help="keep the exports and the tables here (default: temporary)")
    args = parser.parse_args()

    from mlstep.bench.grid import GridSettings, run_grid

    grid = QUICK if args.quick else FULL
    tmp = None
    if args.workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix="mlstep-seed-tables-")
        workdir = Path(tmp.name)
    else:
        workdir = args.workdir
        workdir.mkdir(parents=True, exist_ok=True)
    try:
        if args.only in (None, "bert"):
            start = time.perf_counter()
            bert = export_bert(workdir / "bert-base.onnx", workdir / "bert-base-config.json")
            print(f"exported bert-base (BertConfig(), dynamo, opset 18) in {time.perf_counter() - start:.0f}s",
                  flush=True)
            settings = GridSettings(batch_sizes=grid["bert_batches"], sequence_lengths=grid["bert_seqs"],
                                    warmup=grid["warmup"], repeat=grid["repeat"], use_gpu=args.use_gpu,
                                    threads=args.threads,
                                    torch_model=None if args.no_torch else str(workdir / "bert-base-config.json"))
            result = run_grid(bert, settings)
            result.write(workdir / "bert-base")
            print_table("bert-base (BertConfig(), random weights): median latency in ms", result)
        if args.only in (None, "gpt2"):
            start = time.perf_counter()
            gpt2 = export_gpt2_with_past(workdir / "gpt2-past.onnx")
            print(f"\nexported gpt2 with past (GPT2Config(), GPT2LMHeadModel, dynamo, opset 18) in "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
            settings = GridSettings(batch_sizes=grid["gpt2_batches"], sequence_lengths=grid["gpt2_pasts"],
                                    past_sequence_lengths=grid["gpt2_pasts"], warmup=grid["warmup"],
                                    repeat=grid["repeat"], use_gpu=args.use_gpu, threads=args.threads)
            result = run_grid(gpt2, settings)
            result.write(workdir / "gpt2")
            print_table("gpt2 with past (GPT2Config(), random weights), one new token: median latency in ms",
                        result)
        if tmp is None:
            print(f"\ntables (md, csv, json, png): {workdir}/bert-base, {workdir}/gpt2")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
