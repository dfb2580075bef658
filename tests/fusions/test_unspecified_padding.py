"""Older GPT-2 masking (``Where(causal table, scores, -1e4) + (1 - mask) * -1e4``): fused, padded rows unspecified.

The export *replaces* future scores and *adds* the padding bias, so a query that sees no key (a left-padded
position) gets a softmax no additive-bias fused op reproduces. Every other row is exact. The fusion is taken, the
mask input is recorded as unspecified padding (the model's metadata, every variant), parity leaves its padded
positions out and says so; ``exact_padding`` refuses as before. Files: ONNX Runtime's own test graphs
(``../shared/peer-suite``, PyTorch 1.5 export and its generator's graphs); skipped when the suite is absent.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from mlstep import runtime
from mlstep.optimizer import io
from mlstep.optimizer.fusions._base import UNSPECIFIED_PADDING
from mlstep.optimizer.options import OptimizeOptions
from mlstep.optimizer.pipeline import optimize
from mlstep.precision import to_fp16
from mlstep.validate.parity import FP32_ATOL, FP32_RTOL, check_parity, padded_axes, parity_cases, runnable_cases

SUITE = Path(__file__).resolve().parents[3] / "shared" / "peer-suite" / "models"
PAST_MASK = SUITE / "fusion" / "gpt2_past_mask_one_layer.onnx"         # PyTorch 1.5 GPT-2, 1 layer, n_ctx 8
ATTENTION = SUITE / "generated" / "gpt2_attention.onnx"
ATTENTION_ADD = SUITE / "generated" / "gpt2_attention_add.onnx"
BLIND_REASON = "the attention masking's fill is not additive"

pytestmark = pytest.mark.skipif(not PAST_MASK.exists(), reason="peer suite not checked out beside the repo")


def _fused(path: Path, directory: Path, **options) -> tuple[object, Path]:
    result = optimize(io.load(path), OptimizeOptions(model_type="gpt2", **options), source_dir=path.parent)
    return result, io.save(result.model, directory / "model.onnx")


@pytest.fixture(scope="module")
def past_mask(tmp_path_factory):
    """(optimize result, fp32 path, fp16 path) of the PyTorch 1.5 GPT-2 with past and attention mask."""
    directory = tmp_path_factory.mktemp("past_mask")
    result, path = _fused(PAST_MASK, directory / "fp32")
    fp16 = io.save(to_fp16(io.load(path)), directory / "fp16" / "model.onnx")
    return result, path, fp16


def _metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}


def test_fused_and_recorded(past_mask):
    result, fp32, fp16 = past_mask
    assert result.fusions.get("Attention") == 1 and result.coverage["attention"].complete
    assert result.unspecified_padding == ("attention_mask",)
    assert any("'attention_mask'" in line and "--exact-padding" in line for line in result.summary_lines())
    for path in (fp32, fp16):       # the fp16 conversion keeps it; no fused node keeps its own copy
        assert _metadata(path)[UNSPECIFIED_PADDING] == "attention_mask"
        nodes = onnx.load(str(path)).graph.node
        assert all(UNSPECIFIED_PADDING not in {p.key for p in n.metadata_props} for n in nodes)


@pytest.mark.parametrize("path", [PAST_MASK, ATTENTION, ATTENTION_ADD], ids=lambda p: p.stem)
def test_exact_padding_refuses_with_the_old_reason(path, tmp_path):
    result, saved = _fused(path, tmp_path, exact_padding=True)
    assert result.fusions.get("Attention", 0) == 0 and not result.unspecified_padding
    assert BLIND_REASON in result.coverage["attention"].misses[0]
    assert UNSPECIFIED_PADDING not in _metadata(saved)


@pytest.mark.parametrize("path", [ATTENTION, ATTENTION_ADD], ids=lambda p: p.stem)
def test_generated_graphs_fuse_with_the_mask_recorded(path, tmp_path):
    result, saved = _fused(path, tmp_path)
    assert result.fusions.get("Attention") == 1 and result.unspecified_padding == ("input_mask",)
    assert _metadata(saved)[UNSPECIFIED_PADDING] == "input_mask"


def test_parity_axes_are_facts(past_mask):
    """'505' (hidden states) has no dims in the graph: its axes come from the run-time shapes; present_0's from the
    value analysis ([2, batch, heads, past + sequence, head size])."""
    _, fp32, _ = past_mask
    cases, outputs, _ = runnable_cases(PAST_MASK, parity_cases(io.load(PAST_MASK)))
    assert padded_axes(PAST_MASK, "attention_mask", cases, outputs) == {"505": (0, 1), "present_0": (1, 3)}


@pytest.mark.parametrize("variant", ["fp32", "fp16"])
def test_parity_leaves_out_padded_positions_and_says_so(past_mask, variant):
    _, fp32, fp16 = past_mask
    cases, outputs, _ = runnable_cases(PAST_MASK, parity_cases(io.load(PAST_MASK)))
    assert any("left-padded" in c.name for c in cases)
    result = check_parity(PAST_MASK, fp32 if variant == "fp32" else fp16, variant, cases, reference_outputs=outputs)
    assert result.passed, (result.worst_output, result.worst_case, result.max_abs_diff)
    assert result.unspecified_padding == "attention_mask" and set(result.excluded) == {"505", "present_0"}
    count, biggest = result.excluded["505"]
    # the rows left out really differ (by 10x the fp32 absolute tolerance): leaving them out is what lets this pass
    assert count > 0 and biggest > 10 * FP32_ATOL


def test_parity_still_fails_on_a_real_row(past_mask, tmp_path):
    """Near miss: the candidate keeps the marker but its fill lets padded keys through (-1 instead of -1e4), so
    real queries after padding read them: parity must fail, the exclusion does not hide it."""
    _, fp32, _ = past_mask
    model = onnx.load(str(fp32))
    node = next(n for n in model.graph.node if n.op_type == "Attention")
    next(a for a in node.attribute if a.name == "mask_filter_value").f = -1.0
    broken = tmp_path / "broken.onnx"
    onnx.save(model, str(broken))
    assert _metadata(broken)[UNSPECIFIED_PADDING] == "attention_mask"
    cases, outputs, _ = runnable_cases(PAST_MASK, parity_cases(io.load(PAST_MASK)))
    result = check_parity(PAST_MASK, broken, "fp32", cases, reference_outputs=outputs)
    assert not result.passed and "padded" in result.worst_case


def test_padding_bias_that_does_not_block_is_refused(tmp_path):
    """Near miss in the source: the padding bias is (1 - mask) * -100 (padded keys still weigh on every real row
    after them): not a masking the fused op computes, refused whatever exact_padding says."""
    model = onnx.load(str(PAST_MASK))
    scale = next(t for t in model.graph.initializer if t.name == "216")
    assert float(onnx.numpy_helper.to_array(scale)) == -10000.0
    scale.CopyFrom(onnx.numpy_helper.from_array(np.array(-100.0, dtype=np.float32), "216"))
    path = tmp_path / "near_miss.onnx"
    onnx.save(model, str(path))
    result, saved = _fused(path, tmp_path / "out")
    assert result.fusions.get("Attention", 0) == 0 and not result.unspecified_padding
    assert "does not block" in result.coverage["attention"].misses[0]
    assert UNSPECIFIED_PADDING not in _metadata(saved)


def _feeds(ids, mask, past):
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)[:, -ids.shape[1]:]
    return {"input_ids": ids, "attention_mask": mask.astype(np.float32), "position_ids": positions.astype(np.int64),
            "past_0": past}


def test_two_generation_steps_agree_on_every_real_token(past_mask):
    """Prompt (left-padded by 1 and 3 in a batch of 2), then one generated token fed with the present as past:
    every real token's hidden state and the real positions of both presents match the source at the fp32
    tolerance; the padded positions (which no real token reads) are the only ones that differ."""
    _, fp32, _ = past_mask
    source = runtime.session(PAST_MASK, ["CPUExecutionProvider"], runtime.DISABLE_ALL, exact=True)
    fused = runtime.session(fp32, ["CPUExecutionProvider"], runtime.ENABLE_ALL, exact=True)
    rng = np.random.default_rng(3)
    mask = np.array([[0, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=np.int64)
    ids = rng.integers(0, 8, size=(2, 5)).astype(np.int64)
    past = np.zeros((2, 2, 2, 0, 2), dtype=np.float32)
    tolerance_failures, padded_diff = [], 0.0

    def close(a, b, where, label):
        diff = np.abs(a.astype(np.float64) - b)[where]
        if not np.all(diff <= FP32_ATOL + FP32_RTOL * np.abs(b.astype(np.float64))[where]):
            tolerance_failures.append((label, float(diff.max())))

    presents = {}
    for step, (step_ids, step_mask) in enumerate([(ids, mask), (ids[:, :1] + 1, np.concatenate(
            [mask, np.ones((2, 1), np.int64)], axis=1))]):
        outs = {}
        for name, session in (("source", source), ("fused", fused)):
            feeds = _feeds(step_ids, step_mask, presents.get(name, past))
            outs[name] = runtime.run(session, feeds)
            presents[name] = outs[name]["present_0"]
        real_queries = step_mask[:, -step_ids.shape[1]:].astype(bool)           # [B, S]
        hidden = np.broadcast_to(real_queries[:, :, None], outs["source"]["505"].shape)
        close(outs["fused"]["505"], outs["source"]["505"], hidden, f"step {step} hidden")
        real_keys = np.broadcast_to(step_mask.astype(bool)[None, :, None, :, None], outs["source"]["present_0"].shape)
        close(outs["fused"]["present_0"], outs["source"]["present_0"], real_keys, f"step {step} present")
        padded_diff = max(padded_diff, float(np.abs(outs["fused"]["505"] - outs["source"]["505"])[~hidden].max()
                                             if (~hidden).any() else 0.0))
    assert not tolerance_failures, tolerance_failures
    assert padded_diff > 10 * FP32_ATOL     # the prompt's padded rows do differ: the case is real


def test_cli_reports_what_parity_left_out_and_exact_padding_refuses(tmp_path):
    """The command as users run it: by default the report says plainly which values parity left out; with
    --exact-padding the option is recorded and the attention block stays unfused with the old reason (exit 1)."""
    import json
    import subprocess
    import sys

    script = Path(sys.executable).parent / "mlstep"
    command = [str(script)] if script.exists() else [sys.executable, "-c", "from mlstep.cli.main import app; app()"]
    runs = {}
    for name, extra in (("default", []), ("exact", ["--exact-padding"])):
        out = tmp_path / name
        proc = subprocess.run(command + ["optimize", str(PAST_MASK), "--output", str(out), "--skip-benchmark",
                                         "--no-register", "--form", "fused", *extra],
                              capture_output=True, text=True, timeout=600)
        runs[name] = (proc, json.loads((out / "report.json").read_text()), (out / "report.md").read_text())
    proc, report, markdown = runs["default"]
    assert proc.returncode == 0, proc.stderr
    assert report["options"]["exact_padding"] is False
    for variant in ("fp32", "fp16"):
        left_out = report["variants"][variant]["parity"]["not_compared"]
        assert left_out["mask"] == "attention_mask" and left_out["values"] > 0 and left_out["max_abs_diff"] > 0
        assert left_out["reason"] in markdown and "--exact-padding" in left_out["reason"]
    assert any("'attention_mask'" in note for note in report["notes"])
    proc, report, _ = runs["exact"]
    assert proc.returncode == 1 and report["options"]["exact_padding"] is True
    assert BLIND_REASON in report["coverage"]["blocks"]["attention"]["misses"][0]
    assert all("not_compared" not in v["parity"] for v in report["variants"].values())
