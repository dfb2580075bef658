"""fp16 conversion keeps in float32 what float16 cannot represent, decided by measurement
(:mod:`mlstep.precision_ranges`): a normalization whose input sits on a large offset with a small spread, and the
chain producing that input. Checked by ONNX Runtime parity against the float32 source (fp16 tolerance unchanged)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from mlstep.export import ExportSpec
from mlstep.precision import kept_float32, to_fp16
from mlstep.precision_ranges import NORMALIZATIONS, THRESHOLD, measure
from mlstep.validate import check_parity
from mlstep.validate.parity import parity_cases

PEER = Path(__file__).resolve().parents[2] / "shared" / "peer-suite" / "models" / "generated"
PEER_ENTRIES = ["gpt2_embedlayer", "gpt2_embedlayer_one_attn", "gpt2_embedlayer_one_attn_output_sum",
                "gpt2_embedlayer_one_attn_output_sum_no_sln"]
HIDDEN = 32


def offset_layernorm(path: Path, offset: float, scale: float = 1.0) -> Path:
    """x -> MatMul(w1) -> Add(offset) -> LayerNormalization -> MatMul(w2) -> y.

    The MatMul's output is spread ~``scale`` around 0; the per-channel bias ``offset + U(-0.5, 0.5)`` moves the
    row before the LayerNorm (like an embedding table stored on a large offset: in float16 each channel's bias
    is rounded to the step at ``offset``, 0.5 at 1000, which the row's spread of ~1 cannot absorb)."""
    rng = np.random.default_rng(0)
    f = TensorProto.FLOAT
    inits = [numpy_helper.from_array((rng.standard_normal((HIDDEN, HIDDEN)) * scale / HIDDEN ** 0.5)
                                     .astype(np.float32), "w1"),
             numpy_helper.from_array((offset + rng.uniform(-0.5, 0.5, HIDDEN)).astype(np.float32), "offset"),
             numpy_helper.from_array(np.ones(HIDDEN, np.float32), "gamma"),
             numpy_helper.from_array(np.zeros(HIDDEN, np.float32), "beta"),
             numpy_helper.from_array((rng.standard_normal((HIDDEN, HIDDEN)) / HIDDEN ** 0.5).astype(np.float32), "w2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Add", ["h", "offset"], ["shifted"], name="shift"),
             helper.make_node("LayerNormalization", ["shifted", "gamma", "beta"], ["normed"], name="ln", axis=-1,
                              epsilon=1e-5),
             helper.make_node("MatMul", ["normed", "w2"], ["y"], name="mm2")]
    graph = helper.make_graph(nodes, "offset_ln", [helper.make_tensor_value_info("x", f, ["batch", "sequence", HIDDEN])],
                              [helper.make_tensor_value_info("y", f, ["batch", "sequence", HIDDEN])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), str(path))
    return path


def _fp16_parity(src: Path, dst: Path, model: ir.Model, **kwargs):
    fp16 = to_fp16(model, **kwargs)
    ir.save(fp16, dst)
    return fp16, check_parity(src, dst, "fp16", parity_cases(ir.load(src)))


def _dtypes(model: ir.Model) -> dict[str, ir.DataType]:
    """Node name -> its first output's element type (after ONNX shape inference: the graph has no value_info)."""
    inferred = ir.from_proto(onnx.shape_inference.infer_shapes(ir.to_proto(model), strict_mode=True))
    return {n.name: n.outputs[0].dtype for n in inferred.graph if n.name}


def test_a_layernorm_on_a_large_offset_stays_float32_and_passes_parity(tmp_path):
    """Offset 1000, spread ~1: float16's step at 1000 is 0.5. Without the rule parity fails; with it the Add
    that builds the offset sum and the LayerNorm run in float32, the MatMuls stay float16."""
    src = offset_layernorm(tmp_path / "src.onnx", offset=1000.0)
    _, without = _fp16_parity(src, tmp_path / "plain.onnx", ir.load(src), measure_ranges=False)
    assert not without.passed and without.max_abs_diff > 0.1, without
    fp16, with_rule = _fp16_parity(src, tmp_path / "kept.onnx", ir.load(src))
    assert with_rule.passed, with_rule
    dtypes = _dtypes(fp16)
    assert dtypes["shift"] == dtypes["ln"] == ir.DataType.FLOAT
    assert dtypes["mm1"] == dtypes["mm2"] == ir.DataType.FLOAT16
    assert fp16.graph.initializers["offset"].const_value.dtype == ir.DataType.FLOAT      # read by the Add only
    assert fp16.graph.initializers["w1"].const_value.dtype == ir.DataType.FLOAT16
    facts = kept_float32(fp16)
    [kept] = facts["kept_float32"]
    assert kept["node"] == "ln" and kept["ops"] == ["shift"] and kept["fp16_error_ratio"] > 100 * THRESHOLD
    assert 1000 < kept["max_abs_input"] < 1010 and facts["note"] is None


@pytest.mark.parametrize("offset,scale", [(0.0, 1.0), (0.0, 1000.0), (100.0, 300.0)])
def test_near_miss_large_values_with_a_wide_spread_stay_float16(tmp_path, offset, scale):
    """Large magnitudes alone do not keep anything: values of ~1e3 centred on 0, or an offset of 100 under a
    spread of ~300, are resolved by float16 (its error relative to the row's normalized peak stays ~1e-3)."""
    src = offset_layernorm(tmp_path / "src.onnx", offset=offset, scale=scale)
    fp16, result = _fp16_parity(src, tmp_path / "fp16.onnx", ir.load(src))
    assert result.passed, result
    assert kept_float32(fp16) == {"kept_float32": [], "lines": [], "note": None}
    dtypes = _dtypes(fp16)
    assert {dtypes[n] for n in ("mm1", "shift", "ln", "mm2")} == {ir.DataType.FLOAT16}


def _assert_all_normalizations_fp16(src: Path, model: ir.Model, tmp_path: Path) -> None:
    decision = measure(model)
    assert decision.kept == [] and decision.note is None
    fp16, result = _fp16_parity(src, tmp_path / "fp16.onnx", model)
    assert result.passed, result
    norms = [n for n in fp16.graph if n.op_type in NORMALIZATIONS]
    weights = {v.dtype for n in norms for v in n.inputs if v is not None and v.is_initializer()
               and v.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)}
    assert norms and weights == {ir.DataType.FLOAT16}         # gamma/beta/tables converted: computed in float16
    assert kept_float32(fp16)["kept_float32"] == []


def test_a_tiny_bert_keeps_no_float32_normalization(exported, tmp_path):
    from mlstep.optimizer import optimize_file

    src = exported(ExportSpec("bert", "dynamo", 18, "sdpa"))
    _assert_all_normalizations_fp16(src, optimize_file(src).model, tmp_path)


def test_a_tiny_gpt2_keeps_no_float32_normalization(exported_gpt2, tmp_path):
    from mlstep.optimizer import optimize_file

    src = exported_gpt2("lm", "torchscript", 14, "sdpa", True)
    _assert_all_normalizations_fp16(src, optimize_file(src).model, tmp_path)


@pytest.mark.skipif(not PEER.is_dir(), reason=f"the peer suite is not checked out at {PEER}")
@pytest.mark.parametrize("entry", PEER_ENTRIES)
def test_peer_gpt2_embedlayer_fp16_variant_passes_parity(entry, tmp_path):
    """ONNX Runtime's GPT-2 EmbedLayerNormalization test graphs: the residual sum before the last
    SkipLayerNormalization reaches ~850 (or ~36000) with a row spread of ~2 (~140): fp16 parity was off by
    0.17-0.25. The variants stage (the step's conversion) keeps that SkipLayerNormalization and its MatMul/Add
    input chain in float32 and says so."""
    from mlstep.optimizer import optimize_file
    from mlstep.variants import build_variants, precision_facts

    src = PEER / f"{entry}.onnx"
    paths, fusions = build_variants(optimize_file(src).model, ("fp32", "fp16"), tmp_path)
    assert fusions["fp16"]["SkipLayerNormalization"] == 1 and fusions["fp16"]["EmbedLayerNormalization"] == 1
    cases = parity_cases(ir.load(src))
    for name in ("fp32", "fp16"):
        result = check_parity(src, paths[name], name, cases)
        assert result.passed, (name, result)
    facts = precision_facts(paths["fp16"])
    kept = {k["op"]: k for k in facts["kept_float32"]}
    assert kept["SkipLayerNormalization"]["ops"] and kept["SkipLayerNormalization"]["fp16_error_ratio"] > 0.1
    assert precision_facts(paths["fp32"])["kept_float32"] == []


@pytest.mark.skipif(not PEER.is_dir(), reason=f"the peer suite is not checked out at {PEER}")
def test_the_step_reports_what_it_kept_in_float32(tmp_path):
    """``mlstep optimize`` on gpt2_embedlayer: both gates pass, report.json carries the measured facts under
    ``variants.fp16.precision`` and report.md says ``kept in float32: ... — ...`` with the numbers."""
    import json

    from mlstep import step

    result = step.run(PEER / "gpt2_embedlayer.onnx", tmp_path / "out",
                      settings=step.StepSettings(benchmark=False))
    assert result.passed
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    kept = report["variants"]["fp16"]["precision"]["kept_float32"]
    assert "SkipLayerNormalization" in {k["op"] for k in kept}
    assert report["variants"]["fp32"]["precision"] == {"kept_float32": [], "note": None}
    markdown = (tmp_path / "out" / "report.md").read_text()
    sln = next(k for k in kept if k["op"] == "SkipLayerNormalization")
    line = next(line for line in markdown.splitlines() if "kept in float32: SkipLayerNormalization" in line)
    assert line.startswith("- fp16: ") and f"{sln['max_abs_input']:.4g}" in line and "threshold 0.002" in line
