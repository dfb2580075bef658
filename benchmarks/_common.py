"""Shared helpers for the benchmark scripts (not part of the product, not pytest tests)."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable

# Short names for fused (and fusion-relevant) ops in the compact column.
ABBREV = {
    "Attention": "Att",
    "MultiHeadAttention": "MHA",
    "GroupQueryAttention": "GQA",
    "EmbedLayerNormalization": "ELN",
    "SkipLayerNormalization": "SLN",
    "SkipSimplifiedLayerNormalization": "SSLN",
    "SimplifiedLayerNormalization": "SimLN",
    "LayerNormalization": "LN",
    "BiasGelu": "BG",
    "Gelu": "G",
    "FastGelu": "FG",
    "QuickGelu": "QG",
    "BiasSplitGelu": "BSG",
    "RotaryEmbedding": "Rot",
}
ORDER = list(ABBREV)


def op_counts(model_path: str | os.PathLike) -> Counter:
    """Count fusion-relevant ops (com.microsoft ops + LayerNormalization) in a saved model."""
    import onnx

    model = onnx.load(str(model_path), load_external_data=False)
    counts: Counter = Counter()
    for node in model.graph.node:
        if node.domain == "com.microsoft" or node.op_type in ABBREV:
            counts[node.op_type] += 1
    return counts


def compact(counts: dict[str, int]) -> str:
    parts = []
    for op in sorted(counts, key=lambda o: (ORDER.index(o) if o in ORDER else 99, o)):
        if counts[op]:
            parts.append(f"{ABBREV.get(op, op)}{counts[op]}")
    return " ".join(parts) or "-"


def fmt_parity(parity: dict | None) -> str:
    if not parity:
        return "-"
    return f"{parity['max_abs_diff']:.1e} {'pass' if parity['passed'] else 'FAIL'}"


def short_error(text: str, limit: int = 90) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    # Prefer the exception line (last line of a traceback).
    line = lines[-1] if lines else "error"
    line = re.sub(r"\s+", " ", line)
    return (line[: limit - 1] + "…") if len(line) > limit else line


def run_json_subprocess(args: list[str], timeout: float) -> dict:
    """Run ``python args...`` expecting a JSON object as the last stdout line; errors become {'error': ...}."""
    try:
        proc = subprocess.run([PY, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                break
    if proc.returncode < 0:
        return {"error": f"crashed (signal {-proc.returncode})"}
    return {"error": short_error(proc.stderr or proc.stdout or f"exit {proc.returncode}")}


def measure_child(cmd: list[str], timeout: float = 3600, env: dict | None = None) -> dict:
    """Wall time and peak RSS (MiB) of one command run in a fresh child (GNU time -v when present)."""
    gnu_time = Path("/usr/bin/time")
    start = time.perf_counter()
    if gnu_time.exists():
        proc = subprocess.run([str(gnu_time), "-v", *cmd], capture_output=True, text=True, timeout=timeout,
                              env=env)
        wall = time.perf_counter() - start
        match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr)
        rss_mib = int(match.group(1)) / 1024 if match else float("nan")
    else:  # a fresh python wrapper so RUSAGE_CHILDREN only sees this command
        wrapper = ("import resource,subprocess,sys; r=subprocess.run(sys.argv[1:]).returncode; "
                   "print('MAXRSS', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
                   "sys.exit(r)")
        proc = subprocess.run([PY, "-c", wrapper, *cmd], capture_output=True, text=True, timeout=timeout, env=env)
        wall = time.perf_counter() - start
        match = re.search(r"MAXRSS (\d+)", proc.stderr)
        rss_mib = int(match.group(1)) / 1024 if match else float("nan")
    return {"wall_s": wall, "rss_mib": rss_mib, "rc": proc.returncode,
            "stderr": proc.stderr[-3000:], "stdout": proc.stdout[-20000:]}


def mlstep_cli() -> str:
    return str(Path(PY).parent / "mlstep")


def export_bert(out: str | os.PathLike, layers: int = 12, hidden: int = 768, heads: int = 12,
                intermediate: int = 3072, timeout: float = 3600) -> dict:
    """Export a random-weight BERT with the dynamo exporter + external data, in a fresh child process."""
    code = (
        "import sys, logging, warnings; sys.path.insert(0, %r); logging.disable(logging.WARNING);"
        "warnings.simplefilter('ignore');"
        "import transformers as tf; from mlstep.export import build_model, export_encoder;"
        "cfg = tf.BertConfig(num_hidden_layers=%d, hidden_size=%d, num_attention_heads=%d, "
        "intermediate_size=%d); cfg._attn_implementation = 'sdpa';"
        "export_encoder(build_model(cfg), %r, 'dynamo', 18, external_data=True)"
    ) % (str(ROOT), layers, hidden, heads, intermediate, str(out))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return measure_child([PY, "-c", code], timeout=timeout)


def export_gpt2_past(out: str | os.PathLike, layers: int = 36, n_embd: int = 1280, heads: int = 20,
                     timeout: float = 3600) -> dict:
    """Export a random-weight GPT2LMHeadModel with past (dynamo 18, external data), in a fresh child process."""
    code = (
        "import sys, logging, warnings; sys.path.insert(0, %r); logging.disable(logging.WARNING);"
        "warnings.simplefilter('ignore');"
        "import transformers as tf; from mlstep.export import build_gpt2, export_gpt2;"
        "cfg = tf.GPT2Config(n_layer=%d, n_embd=%d, n_head=%d); cfg._attn_implementation = 'sdpa';"
        "export_gpt2(build_gpt2(cfg), %r, 'dynamo', 18, with_past=True, external_data=True)"
    ) % (str(ROOT), layers, n_embd, heads, str(out))
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    return measure_child([PY, "-c", code], timeout=timeout)


def dir_size(path: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


_LOADS_CODE = (
    "import json, sys, onnxruntime as ort\n"
    "try:\n"
    "    so = ort.SessionOptions(); so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL\n"
    "    ort.InferenceSession(sys.argv[1], so, providers=['CPUExecutionProvider']); print(json.dumps({'ok': True}))\n"
    "except Exception as e:\n"
    "    print(json.dumps({'ok': False, 'error': str(e).strip().splitlines()[-1][-160:]}))\n"
)


def check_loads(model_path: str | os.PathLike, timeout: float = 600) -> str:
    """'yes' when ONNX Runtime can create a session for the model, else 'NO: <reason>' (fresh child)."""
    r = run_json_subprocess(["-c", _LOADS_CODE, str(model_path)], timeout)
    if r.get("ok"):
        return "yes"
    return "NO: " + short_error(r.get("error", "?"), 120)
