"""tf2onnx attention written with Einsum and 3-D Dense kernels (ORT's ``create_tf2onnx_attention_3d`` layout, built
here with onnx.helper, random weights): Einsum lowered to MatMul/Transpose/Reshape, then fused to Attention, with
parity at batch 3 x 8 and 2 x 70, masks padded right, left and holed:
- a padding mask ``(1 - mask) * -10000`` -> the raw mask, K scaled by 1/sqrt(d) on its operand;
- ORT's generator graph: K scaled by -10000 and the mask bias ``(1 - mask) * 0.125`` (not a padding mask) -> the
  scale attribute and the bias as attention_bias;
Near-misses: the scores contracted over the heads instead of the head size (lowered, with parity, but not an
attention); a bias that varies per query, not per key (refused, with the reason).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_attention_handmade import assert_parity, fused_node

from mlstep.optimizer.fusions import attention, einsum
from mlstep.optimizer.fusions._base import FusionContext, run_fusion
from mlstep.optimizer.passes import prepare

HIDDEN, HEADS, HEAD = 16, 4, 4
CTX = FusionContext("bert_tf", 0, HIDDEN)


def einsum_graph(k_scale: float = HEAD ** -0.5, fill: float = -10000.0, scores_eq: str = "aecd,abcd->acbe",
                 mask_axes=(1, 2)) -> onnx.ModelProto:
    rng = np.random.default_rng(11)
    w = lambda *shape: numpy_helper.from_array(rng.normal(0, 0.4, shape).astype(np.float32))  # noqa: E731
    init = {"wq": w(HIDDEN, HEADS, HEAD), "wk": w(HIDDEN, HEADS, HEAD), "wv": w(HIDDEN, HEADS, HEAD),
            "bq": w(HEADS, HEAD), "bk": w(HEADS, HEAD), "bv": w(HEADS, HEAD), "wo": w(HEADS, HEAD, HIDDEN),
            "bo": w(HIDDEN), "gamma": w(HIDDEN), "beta": w(HIDDEN),
            "k_scale": numpy_helper.from_array(np.array([k_scale], np.float32)),
            "one": numpy_helper.from_array(np.array([1.0], np.float32)),
            "fill": numpy_helper.from_array(np.array([fill], np.float32)),
            "axes": numpy_helper.from_array(np.array(mask_axes, np.int64))}
    for name, tensor in init.items():
        tensor.name = name
    n = helper.make_node
    dense = "abc,cde->abde"
    nodes = [
        n("Add", ["x1", "x2"], ["sum"]),
        n("LayerNormalization", ["sum", "gamma", "beta"], ["ln"], axis=-1, epsilon=1e-5),
        n("Einsum", ["ln", "wq"], ["q0"], equation=dense), n("Add", ["q0", "bq"], ["q"]),
        n("Einsum", ["ln", "wk"], ["k0"], equation=dense), n("Add", ["k0", "bk"], ["k1"]),
        n("Mul", ["k1", "k_scale"], ["k"]),
        n("Einsum", ["ln", "wv"], ["v0"], equation=dense), n("Add", ["v0", "bv"], ["v"]),
        n("Unsqueeze", ["mask", "axes"], ["m0"]), n("Cast", ["m0"], ["m1"], to=TensorProto.FLOAT),
        n("Sub", ["one", "m1"], ["m2"]), n("Mul", ["m2", "fill"], ["bias"]),
        # the generator's naming: the first operand ("q") is indexed by the key position e
        n("Einsum", ["q", "k"], ["s0"], equation=scores_eq), n("Add", ["s0", "bias"], ["s1"]),
        n("Softmax", ["s1"], ["p"], axis=3),
        n("Einsum", ["p", "v"], ["c"], equation="acbe,aecd->abcd"),
        n("Einsum", ["c", "wo"], ["o0"], equation="abcd,cde->abe"), n("Add", ["o0", "bo"], ["o1"]),
        n("Add", ["o1", "ln"], ["out"]),
    ]
    x = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", "S", HIDDEN])  # noqa: E731
    graph = helper.make_graph(nodes, "einsum_attention", [x("x1"), x("x2"),
                              helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"])],
                              [x("out")], list(init.values()))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _fused(proto: onnx.ModelProto):
    model = prepare(ir.from_proto(proto))
    lowered = run_fusion(einsum.FUSION, model, CTX)
    return model, lowered, run_fusion(attention.FUSION, model, CTX, explain=True)


def test_einsum_attention_with_a_padding_mask_fuses_with_raw_mask(tmp_path):
    proto = einsum_graph()
    model, lowered, log = _fused(proto)
    assert lowered.fused == 9 and not [n for n in model.graph if n.op_type == "Einsum"]   # 6 Einsums, 3 biases
    assert log.fused == 1, log.refused
    node = fused_node(model)
    assert node.attributes.get_int("num_heads") == HEADS and "scale" not in node.attributes
    assert len(node.inputs) == 4 and node.inputs[3] is not None        # the raw mask, no bias
    assert_parity(proto, model, tmp_path)


def test_generator_graph_scale_and_per_key_bias(tmp_path):
    """ORT's graph: K times -10000, padded keys get +0.125: fused exactly as it computes, not as ORT's test
    expects (its expected graph drops both)."""
    proto = einsum_graph(k_scale=-10000.0, fill=0.125)
    model, _, log = _fused(proto)
    assert log.fused == 1, log.refused
    node = fused_node(model)
    assert node.attributes.get_float("scale") == -10000.0
    assert node.inputs[3] is None and node.inputs[5] is not None       # no mask index; attention_bias
    assert_parity(proto, model, tmp_path)


def test_scores_contracted_over_heads_lower_but_do_not_fuse(tmp_path):
    """'aecd,abcd->adbe' sums over the heads c: a valid product (lowered exactly), not an attention."""
    proto = einsum_graph(scores_eq="aecd,abcd->adbe")
    model, lowered, log = _fused(proto)
    assert lowered.fused == 9 and log.fused == 0
    assert [n.op_type for n in model.graph].count("Softmax") == 1
    assert_parity(proto, model, tmp_path)


@pytest.mark.parametrize("fill", [-10000.0, 0.125])
def test_a_bias_per_query_does_not_fuse(fill):
    """The mask broadcast over queries ([B, 1, S, 1]) instead of keys: neither a padding mask nor a per-key bias."""
    proto = einsum_graph(fill=fill, mask_axes=(1, 3))
    model, _, log = _fused(proto)
    assert log.fused == 0
    assert any("nor is it a per-key bias" in r and "one row per key" in r for r in log.refused), log.refused


# --- the lowering alone: exact on every equation it takes, and leaves the others ------------------------

LOWERED = [  # (equation, left shape, right shape, right is a constant)
    ("abc,cd->abd", (2, 5, 6), (6, 3), True),                # Dense with a 2-D kernel
    ("abc,cde->abde", (2, 5, 6), (6, 2, 3), True),           # 3-D kernel (tf2onnx)
    ("abcd,cde->abe", (2, 5, 2, 3), (2, 3, 4), True),        # merge heads and project
    ("abc,dce->abde", (2, 5, 6), (2, 6, 3), True),           # contracted index not first in the kernel
    ("bij,bjk->bik", (3, 4, 5), (3, 5, 2), False),           # batched MatMul
    ("bij,bkj->bik", (3, 4, 5), (3, 2, 5), False),           # times a transpose
    ("abcd,aecd->acbe", (2, 4, 3, 5), (2, 6, 3, 5), False),  # attention scores
    ("acbe,aecd->abcd", (2, 3, 4, 6), (2, 6, 3, 5), False),  # attention context
]
LEFT_ALONE = [
    ("...ij,...jk->...ik", (3, 4, 5), (3, 5, 2), False, "ellipsis"),
    ("bij,bjk->bk", (3, 4, 5), (3, 5, 2), False, "summed within one operand"),
    ("bijm,bjkn->bikmn", (3, 4, 5, 2), (3, 5, 2, 2), False, "two free indices"),
    ("ab,c->abc", (3, 4), (5,), True, "outer product"),
]


def _einsum_model(equation, a_shape, b_shape, b_const):
    rng = np.random.default_rng(5)
    b = numpy_helper.from_array(rng.normal(size=b_shape).astype(np.float32), "b")
    inputs = [helper.make_tensor_value_info("a", TensorProto.FLOAT, list(a_shape))]
    if not b_const:
        inputs.append(helper.make_tensor_value_info("b", TensorProto.FLOAT, list(b_shape)))
    graph = helper.make_graph([helper.make_node("Einsum", ["a", "b"], ["y"], equation=equation)], "e", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [b] if b_const else [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("equation,a_shape,b_shape,b_const", LOWERED)
def test_lowering_is_exact(equation, a_shape, b_shape, b_const):
    from test_attention_handmade import _session

    proto = _einsum_model(equation, a_shape, b_shape, b_const)
    model = prepare(ir.from_proto(proto))
    assert run_fusion(einsum.FUSION, model, CTX).fused == 1
    assert not [n for n in model.graph if n.op_type == "Einsum"]
    rng = np.random.default_rng(6)
    feeds = {"a": rng.normal(size=a_shape).astype(np.float32)}
    if not b_const:
        feeds["b"] = rng.normal(size=b_shape).astype(np.float32)
    want = _session(proto).run(None, feeds)[0]
    got = _session(ir.serde.serialize_model(model)).run(None, feeds)[0]
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("equation,a_shape,b_shape,b_const,why", LEFT_ALONE)
def test_other_equations_are_left_alone(equation, a_shape, b_shape, b_const, why):
    model = prepare(ir.from_proto(_einsum_model(equation, a_shape, b_shape, b_const)))
    log = run_fusion(einsum.FUSION, model, CTX, explain=True)
    assert log.fused == 0 and [n.op_type for n in model.graph] == ["Einsum"], why
    assert log.refused, why
