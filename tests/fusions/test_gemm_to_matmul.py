"""Flattened Conv1D (Reshape -> Gemm -> Reshape) -> MatMul + Add: GPT-2 exports from both exporters, and
near-misses (the outer reshape does not restore the input's leading dims, transB=1, alpha != 1)."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_gelu import ops

from mlstep.optimizer.fusions._base import FusionContext, run_fusion
from mlstep.optimizer.fusions.gemm_to_matmul import FUSION
from mlstep.optimizer.passes import prepare
from mlstep.validate import check_parity, synthesize_inputs

CTX = FusionContext("gpt2", 0, 32)


@pytest.mark.parametrize("exporter,opset,attention,with_past", [("torchscript", 14, "eager", True),
                                                                 ("dynamo", 18, "sdpa", False)])
def test_gpt2_conv1d_gemms_unflatten(exported_gpt2, tmp_path, exporter, opset, attention, with_past):
    path = exported_gpt2("lm", exporter, opset, attention, with_past)
    model = prepare(ir.load(path))
    before = ops(model)
    assert before[("", "Gemm")] == 8                      # c_attn, c_proj, c_fc, mlp.c_proj per layer
    log = run_fusion(FUSION, model, CTX)
    after = ops(model)
    assert log.fused == 8
    assert after[("", "Gemm")] == 0
    assert after[("", "MatMul")] == before[("", "MatMul")] + 8
    projections = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].const_value is not None
                   and not n.outputs[0].is_graph_output()]             # (the LM head makes the logits)
    assert len(projections) == 8
    for node in projections:                              # MatMul on the constant [K, N] weight, then + bias
        assert [u.op_type for u, _ in node.outputs[0].uses()] == ["Add"]
    saved = tmp_path / "unflattened.onnx"
    ir.save(model, saved)
    cases = synthesize_inputs(ir.load(path), batch=3, sequence=5, past_sequence=4 if with_past else 0)
    parity = check_parity(path, saved, "fp32", cases)
    assert parity.passed, (parity.worst_output, parity.max_abs_diff)


# --- synthetic near-misses -------------------------------------------------------------------------

def _flattened_linear(order=(0, 1), trans_b: int = 0, alpha: float = 1.0) -> ir.Model:
    """y = Reshape(Gemm(Reshape(x, [-1, 8]), W, b), Shape(x)[order] ++ [4]) for x: [batch, sequence, 8]."""
    rng = np.random.default_rng(0)
    w = rng.standard_normal((4, 8) if trans_b else (8, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "W"), numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(np.array([-1, 8], np.int64), "flat"),
             numpy_helper.from_array(np.array([4], np.int64), "n")]
    dims = [helper.make_node("Shape", ["x"], ["shape"])]
    for i in order:
        inits.append(numpy_helper.from_array(np.array([i], np.int64), f"i{i}"))
        dims.append(helper.make_node("Gather", ["shape", f"i{i}"], [f"d{i}"], axis=0))
    graph = helper.make_graph(
        dims + [helper.make_node("Concat", [f"d{i}" for i in order] + ["n"], ["out_shape"], axis=0),
                helper.make_node("Reshape", ["x", "flat"], ["x2"]),
                helper.make_node("Gemm", ["x2", "W", "b"], ["g"], transB=trans_b, alpha=alpha),
                helper.make_node("Reshape", ["g", "out_shape"], ["y"])],
        "flattened_linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "sequence", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    return ir.serde.deserialize_model(proto)


def test_synthetic_positive_control():
    model = prepare(_flattened_linear())
    log = run_fusion(FUSION, model, CTX)
    assert log.fused == 1
    assert ops(model)[("", "Gemm")] == 0


@pytest.mark.parametrize("kwargs,says", [
    ({"order": (1, 0)}, "does not restore"),            # [sequence, batch, 4]: a valid reshape, other layout
    ({"trans_b": 1}, "transposed"),
    ({"alpha": 0.5}, "alpha"),
])
def test_near_miss_does_not_fuse(kwargs, says):
    model = prepare(_flattened_linear(**kwargs))
    log = run_fusion(FUSION, model, CTX, explain=True)
    assert log.fused == 0
    assert ops(model)[("", "Gemm")] == 1
    assert any(says in reason for reason in log.refused), log.refused


def _conv1d_after_merged_heads(order=(0, 1)) -> onnx.ModelProto:
    """PyTorch 1.4 GPT-2's c_proj: x = merge_heads(t) (its last dim a Mul of two shape entries, which the shape
    inference does not follow), then Conv1D: x.view(-1, x.size(-1)) via Squeeze(Slice(Shape(x), [-1])), Gemm,
    and .view(x.size()[:-1] + (4,)) as Concat(Shape(x)[order], [4])."""
    rng = np.random.default_rng(0)
    i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
    inits = [numpy_helper.from_array(rng.standard_normal((8, 4)).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(4).astype(np.float32), "b"),
             numpy_helper.from_array(i64(4), "n"), numpy_helper.from_array(i64(-1), "minus1"),  # [-1]
             numpy_helper.from_array(i64(2 ** 62), "end"), numpy_helper.from_array(i64(0), "axes0")]
    nodes = [helper.make_node("Transpose", ["t"], ["tt"], perm=[0, 2, 1, 3]),
             helper.make_node("Shape", ["tt"], ["tshape"])]
    for i in range(4):
        inits.append(numpy_helper.from_array(np.array(i, np.int64), f"k{i}"))
        nodes.append(helper.make_node("Gather", ["tshape", f"k{i}"], [f"t{i}"], axis=0))
    nodes += [helper.make_node("Mul", ["t2", "t3"], ["merged"]),
              *[helper.make_node("Unsqueeze", [src], [f"u_{src}"], axes=[0]) for src in ("t0", "t1", "merged")],
              helper.make_node("Concat", ["u_t0", "u_t1", "u_merged"], ["xshape"], axis=0),
              helper.make_node("Reshape", ["tt", "xshape"], ["x"]),
              helper.make_node("Shape", ["x"], ["shape"]),
              helper.make_node("Slice", ["shape", "minus1", "end", "axes0"], ["last1"]),
              helper.make_node("Squeeze", ["last1"], ["last"], axes=[0]),
              helper.make_node("Unsqueeze", ["last"], ["last_u"], axes=[0]),
              helper.make_node("Concat", ["minus1", "last_u"], ["flat"], axis=0),
              helper.make_node("Reshape", ["x", "flat"], ["x2"]),
              helper.make_node("Gemm", ["x2", "W", "b"], ["g"])]
    for i in order:
        inits.append(numpy_helper.from_array(np.array(i, np.int64), f"j{i}"))
        nodes += [helper.make_node("Gather", ["shape", f"j{i}"], [f"d{i}"], axis=0),
                  helper.make_node("Unsqueeze", [f"d{i}"], [f"ud{i}"], axes=[0])]
    nodes += [helper.make_node("Concat", [f"ud{i}" for i in order] + ["n"], ["out_shape"], axis=0),
              helper.make_node("Reshape", ["g", "out_shape"], ["y"])]
    t = helper.make_tensor_value_info("t", TensorProto.FLOAT, ["b", 2, "s", 4])
    graph = helper.make_graph(nodes, "conv1d", [t],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=6)


def _run(proto, t):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"t": t})[0]


def test_conv1d_on_input_of_unknown_dims_unflattens_with_parity():
    proto = _conv1d_after_merged_heads()
    model = prepare(ir.serde.deserialize_model(proto))
    assert run_fusion(FUSION, model, CTX).fused == 1
    assert ops(model)[("", "Gemm")] == 0
    t = np.random.default_rng(1).standard_normal((3, 2, 5, 4)).astype(np.float32)
    np.testing.assert_allclose(_run(ir.serde.serialize_model(model), t), _run(proto, t), atol=1e-5, rtol=1e-4)


def test_conv1d_whose_target_swaps_the_leading_dims_is_kept():
    """.view(x.size(1), x.size(0), 4): a valid reshape to another layout; with x's dims unknown it must stay."""
    model = prepare(ir.serde.deserialize_model(_conv1d_after_merged_heads(order=(1, 0))))
    log = run_fusion(FUSION, model, CTX, explain=True)
    assert log.fused == 0 and ops(model)[("", "Gemm")] == 1
    # refused with a reason about the dims: unknown, or (once the value analysis names them) not restored
    assert any("input dims unknown" in reason or "does not restore" in reason for reason in log.refused), log.refused
