"""ONNX Runtime's own transformers-optimizer test models (``../shared/peer-suite``): mlstep must keep passing them.

Runs the suite's runner, ``run_peer.py --skip-ort`` (the mlstep side only: ``mlstep optimize`` with ORT's args where
its test passes them, fused-op classes against what ORT's test asserts, fp32 and fp16 parity), with this checkout's
``mlstep`` first on PATH, and asserts:
- no entry ends in an internal error (exit 3) or a traceback;
- the entries that pass today keep passing (``PASSING``), i.e. the pass count does not fall below its floor.

The always-run subset covers one entry per layout class (fast, about a minute on two busy cores); the whole
manifest runs under ``-m slow`` (about eight minutes). Skipped when the suite is not checked out beside the repo.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[2] / "shared" / "peer-suite"
RUNNER = SUITE / "run_peer.py"

# Entries mlstep passes (at least ORT's expected fusions, fp32 and fp16 parity), measured on this branch.
PASSING = {
    "embed_layer_norm_multiple", "embed_layer_norm_format3", "embed_layer_norm_format3_opset13",
    "embed_layer_norm_format8", "embed_layer_norm_format8_opset13", "embed_layer_norm_format9",
    "embed_layer_norm_format9_opset13", "embed_layer_norm_format3_no_cast",
    "embed_layer_norm_format3_no_cast_opset13", "bert_attention", "bert_pruned_attention",
    "bert_attention_reverse_add_order", "keras_bert_squad",
    "bert_attention_varied_qkv", "bert_attention_varied_qkv_wrong_args", "bert_3d_attention_tf2onnx",
    "keras_bert_mrpc_opset10", "gpt2_no_past", "gpt2_past", "gpt2_past_mask_one_layer", "gpt2_megatron",
    "gpt2_embedlayer", "gpt2_embedlayer_one_attn", "gpt2_embedlayer_one_attn_output_sum",
    "gpt2_embedlayer_one_attn_output_sum_no_sln",
}
# One entry per layout class, run always: ReduceSum mask index + Range positions behind -1 dims and unsorted nodes,
# a mask built from the ids' shape, several embeddings, ai.onnx default domain, GPT-2 with past (Reshape(-1, S) ids,
# embedding sum read by the residual: must not crash), Q/K/V of different widths with wrong num_heads/hidden_size
# given, tf2onnx Einsum attention. keras2onnx (Tensordot, Sub(mean, x), Mul(scale, scores)) runs under -m slow.
FAST = ["embed_layer_norm_format8", "embed_layer_norm_format9", "embed_layer_norm_format3_no_cast_opset13",
        "embed_layer_norm_multiple", "bert_attention", "gpt2_past_mask_one_layer",
        "bert_attention_varied_qkv_wrong_args", "bert_3d_attention_tf2onnx"]

pytestmark = pytest.mark.skipif(not RUNNER.is_file(), reason=f"the peer suite is not checked out at {SUITE}")


def _run_suite(tmp_path: Path, only: list[str] | None) -> dict[str, dict]:
    env = dict(os.environ, PEER_SUITE_OUT=str(tmp_path), PATH=f"{Path(sys.executable).parent}{os.pathsep}"
               f"{os.environ.get('PATH', '')}")
    env.pop("MLSTEP_DEBUG", None)
    cmd = [sys.executable, str(RUNNER), "--skip-ort"] + (["--only", ",".join(only)] if only else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    stem = "results_only" if only else "results"
    results = json.loads((tmp_path / f"{stem}.json").read_text())["results"]
    return {r["id"]: r for r in results}


def _check(results: dict[str, dict], expected_passing: set[str]) -> None:
    crashed = {i: [(r["mode"], r["exit"], r["error"]) for r in res.get("mlstep", [])
                   if r["exit"] == 3 or r["traceback"]] for i, res in results.items()}
    crashed = {i: c for i, c in crashed.items() if c}
    assert not crashed, f"internal errors: {crashed}"
    lost = sorted(i for i in expected_passing if not results[i].get("pass"))
    details = {i: [(r["mode"], r["exit"], r["short"], r["parity"]) for r in results[i].get("mlstep", [])]
               for i in lost}
    assert not lost, f"entries that passed no longer pass: {details}"
    passed = sum(1 for r in results.values() if r.get("pass"))
    assert passed >= len(expected_passing)


def test_peer_suite_layout_classes(tmp_path):
    results = _run_suite(tmp_path, FAST)
    assert set(results) == set(FAST)
    _check(results, PASSING & set(FAST))


@pytest.mark.slow
def test_peer_suite_whole_manifest(tmp_path):
    results = _run_suite(tmp_path, None)
    _check(results, PASSING)
