"""GPT-2 with past key/values -> ONNX (dynamo) -> ``mlstep benchmark`` over batch x past length.

    python examples/gpt2_past_benchmark.py                         # tiny GPT-2, past 4,16, batch 1,2
    python examples/gpt2_past_benchmark.py --gpt2 --past 8,32,128  # GPT2Config() (124M), random weights

``mlstep benchmark`` optimizes the export in process (fp32 and fp16 variants), then times one new token on
each past length for the source (baseline) and both variants, and prints the seed's table (rows engine /
precision / batch, columns past=...). ``--output DIR`` keeps benchmark.md/.csv/.json and latency.png.
Offline: nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def mlstep_command() -> list[str]:
    script = Path(sys.executable).parent / "mlstep"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlstep.cli.main"]


def export(path: Path, full_size: bool) -> Path:
    from transformers import GPT2Config

    from mlstep.export import build_gpt2, export_gpt2, tiny_gpt2_config

    config = GPT2Config() if full_size else tiny_gpt2_config()
    config._attn_implementation = "sdpa"
    return export_gpt2(build_gpt2(config, lm_head=True), path, exporter="dynamo", opset=18, with_past=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpt2", action="store_true", help="GPT2Config() (124M parameters) instead of a tiny one")
    parser.add_argument("--past", default="4,16", help="past lengths, the columns (default 4,16)")
    parser.add_argument("--batch", default="1,2", help="batch sizes (default 1,2)")
    parser.add_argument("--repeat", default="30", help="timed calls per cell")
    parser.add_argument("--output", type=Path, help="write benchmark.md/.csv/.json and latency.png here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="mlstep-gpt2-") as work:
        model = export(Path(work) / "gpt2-past.onnx", args.gpt2)
        print(f"exported {'gpt2' if args.gpt2 else 'tiny gpt2'} with past (dynamo, opset 18)", flush=True)
        command = ["benchmark", str(model), "--past-sequence-length", args.past, "-b", args.batch,
                   "--repeat", args.repeat]
        if args.output:
            command += ["--output", str(args.output)]
        print("$ mlstep " + " ".join(command), flush=True)
        return subprocess.call(mlstep_command() + command, env={**os.environ, "COLUMNS": "160"})


if __name__ == "__main__":
    sys.exit(main())
