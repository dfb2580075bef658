"""Encoder attention in the layouts of ONNX Runtime's own test graphs, built here with onnx.helper:
- Q/K and V projections of different widths (pruned heads, ORT's ``create_bert_attention(16, 2, 24, 16)``) ->
  Attention with ``qkv_hidden_sizes``;
- keras2onnx's scale written ``Mul(scale, scores)`` (constant first).
Each with parity at batch 3 with masks padded right, left and holed, on short and long sequences; near-misses:
V split into another number of heads than Q (its one head broadcast over Q's two) must not fuse; a mask that is a
padding mask at every length but the user's must not be fed as one.

Layout (as ORT's test generator writes it): TorchScript-style head split, K^T as Transpose(0, 2, 3, 1), scores
divided by sqrt(head size), the mask bias ``(1 - mask) * -10000``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mlstep.optimizer import optimize
from mlstep.optimizer.fusions._base import MS_DOMAIN, FusionContext, run_fusion
from mlstep.optimizer.fusions.attention import FUSION
from mlstep.optimizer.passes import prepare

HIDDEN = 16


def _masks(batch: int, seq: int) -> dict[str, np.ndarray]:
    """Right-, left-padded and holed rows of different lengths (every row keeps a token)."""
    right = np.array([[1] * seq] + [[1] * (seq - k) + [0] * k for k in (3, seq - 2)][: batch - 1])
    left = np.array([[1] * seq] + [[0] * k + [1] * (seq - k) for k in (3, seq - 2)][: batch - 1])
    holed = np.array([[(i + b) % 3 != 0 for i in range(seq)] for b in range(batch)], dtype=np.int64)
    return {"right": right, "left": left, "holed": holed}


def attention_graph(qk_width: int = 24, v_width: int = 16, heads: int = 2, v_heads: int = 2,
                    scale_first: bool = False, unmasked_at: int = 0) -> onnx.ModelProto:
    """LayerNorm(x1 + x2) -> attention (Q/K ``qk_width`` wide in ``heads`` heads, V ``v_width`` wide in
    ``v_heads`` heads) -> output projection + residual. Batch and sequence symbolic. ``scale_first``: the scores
    scaled as ``Mul(1 / sqrt(d), scores)`` (keras2onnx), else ``Div(scores, sqrt(d))``. ``unmasked_at``: at that
    sequence length (only) the mask bias is all zeros -- a mask that is wrong at one length."""
    rng = np.random.default_rng(7)
    w = lambda *shape: numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32))  # noqa: E731
    init = {"wq": w(HIDDEN, qk_width), "wk": w(HIDDEN, qk_width), "wv": w(HIDDEN, v_width),
            "bq": w(qk_width), "bk": w(qk_width), "bv": w(v_width),
            "wo": w(v_width * heads // v_heads, HIDDEN), "bo": w(HIDDEN),
            "gamma": w(HIDDEN), "beta": w(HIDDEN),
            "qk_shape": numpy_helper.from_array(np.array([0, 0, heads, qk_width // heads], np.int64)),
            "v_shape": numpy_helper.from_array(np.array([0, 0, v_heads, v_width // v_heads], np.int64)),
            "ctx_shape": numpy_helper.from_array(np.array([0, 0, -1], np.int64)),
            "scale": numpy_helper.from_array(np.array([np.sqrt(qk_width // heads)], np.float32)),
            "inv_scale": numpy_helper.from_array(np.array(1 / np.sqrt(qk_width // heads), np.float32)),
            "one": numpy_helper.from_array(np.array([1.0], np.float32)),
            "neg": numpy_helper.from_array(np.array([-10000.0], np.float32)),
            "axes12": numpy_helper.from_array(np.array([1, 2], np.int64))}
    for name, tensor in init.items():
        tensor.name = name
    n = helper.make_node
    nodes = [
        n("Add", ["x1", "x2"], ["sum"]),
        n("LayerNormalization", ["sum", "gamma", "beta"], ["ln"], axis=-1, epsilon=1e-5),
        n("MatMul", ["ln", "wq"], ["q0"]), n("Add", ["q0", "bq"], ["q1"]), n("Reshape", ["q1", "qk_shape"], ["q2"]),
        n("Transpose", ["q2"], ["q"], perm=[0, 2, 1, 3]),
        n("MatMul", ["ln", "wk"], ["k0"]), n("Add", ["k0", "bk"], ["k1"]), n("Reshape", ["k1", "qk_shape"], ["k2"]),
        n("Transpose", ["k2"], ["kt"], perm=[0, 2, 3, 1]),
        n("MatMul", ["ln", "wv"], ["v0"]), n("Add", ["v0", "bv"], ["v1"]), n("Reshape", ["v1", "v_shape"], ["v2"]),
        n("Transpose", ["v2"], ["v"], perm=[0, 2, 1, 3]),
        n("Unsqueeze", ["mask", "axes12"], ["m0"]), n("Cast", ["m0"], ["m1"], to=TensorProto.FLOAT),
        n("Sub", ["one", "m1"], ["m2"]), n("Mul", ["m2", "neg"], ["bias" if not unmasked_at else "bias0"]),
        n("MatMul", ["q", "kt"], ["s0"]),
        n("Mul", ["inv_scale", "s0"], ["s1"]) if scale_first else n("Div", ["s0", "scale"], ["s1"]),
        n("Add", ["s1", "bias"], ["s2"]),
        n("Softmax", ["s2"], ["p"], axis=3),
        n("MatMul", ["p", "v"], ["c0"]), n("Transpose", ["c0"], ["c1"], perm=[0, 2, 1, 3]),
        n("Reshape", ["c1", "ctx_shape"], ["c2"]),
        n("MatMul", ["c2", "wo"], ["o0"]), n("Add", ["o0", "bo"], ["o1"]), n("Add", ["o1", "ln"], ["out"]),
    ]
    if unmasked_at:
        init["at"] = numpy_helper.from_array(np.array(unmasked_at, np.int64), "at")
        init["seq_axis"] = numpy_helper.from_array(np.array(1, np.int64), "seq_axis")
        init["zero"] = numpy_helper.from_array(np.array(0.0, np.float32), "zero")
        after = next(i for i, node in enumerate(nodes) if node.output[0] == "bias0") + 1
        nodes[after:after] = [
            n("Shape", ["mask"], ["mask_shape"]), n("Gather", ["mask_shape", "seq_axis"], ["seq"], axis=0),
            n("Equal", ["seq", "at"], ["is_at"]), n("Mul", ["bias0", "zero"], ["no_bias"]),
            n("Where", ["is_at", "no_bias", "bias0"], ["bias"])]
    x = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["B", "S", HIDDEN])  # noqa: E731
    graph = helper.make_graph(nodes, "varied_qkv", [x("x1"), x("x2"),
                              helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"])],
                              [x("out")], list(init.values()))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


def _fuse(proto: onnx.ModelProto, ctx: FusionContext):
    model = prepare(ir.from_proto(proto))
    return model, run_fusion(FUSION, model, ctx, explain=True)


def assert_parity(proto: onnx.ModelProto, model: ir.Model, tmp_path: Path, shapes=((3, 8), (2, 70))) -> None:
    """Batch 3 x sequence 8 and batch 2 x sequence 70 (or ``shapes``), masks padded right, left and holed."""
    path = tmp_path / "fused.onnx"
    ir.save(model, path)
    ref, got = _session(proto), _session(path)
    rng = np.random.default_rng(0)
    for batch, seq in shapes:
        for kind, mask in _masks(batch, seq).items():
            feeds = {"x1": rng.normal(size=(batch, seq, HIDDEN)).astype(np.float32),
                     "x2": rng.normal(size=(batch, seq, HIDDEN)).astype(np.float32), "mask": mask.astype(np.int64)}
            np.testing.assert_allclose(got.run(None, feeds)[0], ref.run(None, feeds)[0], atol=1e-4, rtol=1e-3,
                                       err_msg=f"{kind} {batch}x{seq}")


def fused_node(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if n.op_type == "Attention" and n.domain == MS_DOMAIN]
    assert not [n for n in model.graph if n.op_type == "Softmax"]
    return node


@pytest.mark.parametrize("heads", [0, 8])   # detected, or a wrong count given: the graph's head split decides
def test_varied_qkv_widths_fuse_with_qkv_hidden_sizes_and_parity(tmp_path, heads):
    proto = attention_graph()
    model, log = _fuse(proto, FusionContext("bert", heads, HIDDEN))
    assert log.fused == 1, log.refused
    node = fused_node(model)
    assert node.attributes.get_int("num_heads") == 2
    assert list(node.attributes.get_ints("qkv_hidden_sizes")) == [24, 24, 16]
    assert node.inputs[1].shape == ir.Shape([HIDDEN, 64]) and node.inputs[2].shape == ir.Shape([64])
    assert_parity(proto, model, tmp_path)


def test_scale_constant_first_fuses_with_parity(tmp_path):
    """keras2onnx: ``Mul(0.5, scores)``; equal widths, so no qkv_hidden_sizes."""
    proto = attention_graph(qk_width=HIDDEN, v_width=HIDDEN, scale_first=True)
    model, log = _fuse(proto, FusionContext("bert_keras", 0, HIDDEN))
    assert log.fused == 1, log.refused
    node = fused_node(model)
    assert node.attributes.get_int("num_heads") == 2 and "qkv_hidden_sizes" not in node.attributes
    assert "scale" not in node.attributes          # 1/sqrt(8): the kernel's default
    assert_parity(proto, model, tmp_path)


def test_v_split_into_other_heads_than_q_does_not_fuse():
    """V as one head of 16 (broadcast over Q's two heads by the MatMul): a valid graph, not ORT's Attention."""
    proto = attention_graph(v_heads=1)
    _session(proto)                       # the near-miss is a model ONNX Runtime runs
    model, log = _fuse(proto, FusionContext("bert", 0, HIDDEN))
    assert log.fused == 0
    assert any("V is split into 1 heads, Q into 2" in r for r in log.refused), log.refused
    assert [n.op_type for n in model.graph].count("Softmax") == 1


def test_a_mask_wrong_only_at_the_users_length_is_not_taken_for_a_padding_mask(tmp_path):
    """The bias is a padding mask at every length but 12, where it masks nothing. The fixed probes (6, 9, 70) cannot
    see it: the raw mask would be fed and the fused model is wrong at 12. Probed at the user's length 12 (as the step
    does), it is refused as a padding mask; being one row per key at every length, it goes in as attention_bias,
    exact at 12 and elsewhere."""
    proto = attention_graph(qk_width=HIDDEN, v_width=HIDDEN, unmasked_at=12)
    blind, log = _fuse(proto, FusionContext("bert", 0, HIDDEN))
    assert log.fused == 1 and fused_node(blind).inputs[3] is not None        # the raw mask: wrong at 12
    with pytest.raises(AssertionError):
        assert_parity(proto, blind, tmp_path, shapes=((3, 12),))
    model, log = _fuse(proto, FusionContext("bert", 0, HIDDEN, sequence_lengths=(12,)))
    assert log.fused == 1
    node = fused_node(model)
    assert node.inputs[3] is None and node.inputs[5] is not None
    assert_parity(proto, model, tmp_path, shapes=((3, 8), (3, 12), (2, 70)))
    result = optimize(prepare(ir.from_proto(proto)), sequence_lengths=(12,))   # the pipeline passes them on
    (attention,) = [n for n in result.model.graph if n.op_type == "Attention"]
    assert attention.inputs[3] is None
