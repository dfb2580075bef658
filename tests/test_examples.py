"""Smoke tests of examples/: each script runs end to end, offline, on the CPU, with small settings."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


# Hang guards, not speed limits: an example on a busy 2-core machine (other jobs beside the suite) takes several
# times what it takes on an idle one.
def run_example(name: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    # no MLflow setting of an earlier in-process test (mlflow.set_registry_uri exports MLFLOW_REGISTRY_URI) leaks in
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "COLUMNS": "160"})
    env.pop("GITHUB_STEP_SUMMARY", None)
    proc = subprocess.run([sys.executable, str(EXAMPLES / name), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, f"{name} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


@pytest.mark.timeout(1200)
def test_bert_register_optimize_promote(tmp_path):
    proc = run_example("bert_register_optimize_promote.py", "--workdir", str(tmp_path), "--skip-benchmark")
    out = proc.stdout
    assert "registered models:/bert-tiny/1 with alias candidate" in out
    assert "models:/bert-tiny@champion -> models:/bert-tiny/" in out
    assert re.search(r"champion: models:/bert-tiny/\d+ \(variant fp32, gates passed, source models:/bert-tiny/1\)",
                     out), out
    assert (tmp_path / "out" / "report.json").is_file()


@pytest.mark.timeout(1200)
def test_gpt2_past_benchmark():
    out = run_example("gpt2_past_benchmark.py", "--repeat", "5").stdout
    assert "past=4" in out and "past=16" in out
    for engine in ("onnxruntime (source)", "onnxruntime (mlstep)"):
        assert engine in out
    assert "fp16" in out


@pytest.mark.timeout(1200)
def test_minilm_fp16_embeddings():
    out = run_example("minilm_fp16_embeddings.py", "--skip-benchmark").stdout
    match = re.search(r"min cosine fp32 vs fp16: ([0-9.]+)", out)
    assert match, out
    assert float(match.group(1)) > 0.999


def test_reproduce_seed_tables_help():
    out = run_example("reproduce_seed_tables.py", "--help", timeout=300).stdout
    assert "--quick" in out and "BertConfig()" in out
