"""Embeddings + LayerNorm -> com.microsoft EmbedLayerNormalization: every family on two layouts, BERT
and RoBERTa without token types (their one constant row folded, RoBERTa's all-equal buffer included), parity
under right and left padding at batch 3, and near-misses (constant reversed position ids; a token-type buffer
that is not all equal) that must not fuse."""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_attention import MASKS, _const, assert_parity, feeds_for, graph_input_behind, session
from test_gelu import CTX, ops

from mlstep.export import ENCODER_FAMILIES, ExportSpec, build_model, export_encoder, tiny_config
from mlstep.optimizer.coverage import census
from mlstep.optimizer.fusions import layer_norm
from mlstep.optimizer.fusions._base import MS_DOMAIN, run_fusion
from mlstep.optimizer.fusions.embed_layer_norm import FUSION
from mlstep.optimizer.passes import prepare

PADDED = {k: MASKS[k] for k in ("right", "left")}
LAYOUTS_USED = [("torchscript", 14, "eager"), ("dynamo", 18, "sdpa")]
ELN = (MS_DOMAIN, "EmbedLayerNormalization")


def fused_model(path, explain: bool = False):
    model = prepare(ir.load(path))
    run_fusion(layer_norm.FUSION, model, CTX)      # below opset 17 LayerNorm arrives decomposed
    return model, run_fusion(FUSION, model, CTX, explain=explain)


def eln_node(model: ir.Model) -> ir.Node:
    (node,) = [n for n in model.graph if (n.domain, n.op_type) == ELN]
    return node


@pytest.mark.parametrize("exporter,opset,attention", LAYOUTS_USED)
@pytest.mark.parametrize("family", ENCODER_FAMILIES)
def test_embed_layer_norm_fuses_with_parity(exported, tmp_path, family, exporter, opset, attention):
    path = exported(ExportSpec(family, exporter, opset, attention))
    model, log = fused_model(path)
    assert log.fused == 1
    assert ops(model)[ELN] == 1
    node = eln_node(model)
    assert graph_input_behind(node.inputs[0], model) == "input_ids"
    has_tt = family != "distilbert"
    segment = node.inputs[1] if len(node.inputs) > 1 else None
    assert (segment is not None and graph_input_behind(segment, model) == "token_type_ids") == has_tt
    # RoBERTa's positions depend on the ids (padding-aware): they must reach ELN's position_ids input
    positions = node.inputs[8] if len(node.inputs) > 8 else None
    assert (positions is not None) == (family == "roberta")
    # the embedding LayerNorm is gone (the encoder's two per layer remain)
    assert ops(model)[("", "LayerNormalization")] == 4
    assert_parity(path, model, tmp_path, PADDED)


@pytest.mark.parametrize("exporter,opset,attention", LAYOUTS_USED)
def test_bert_without_token_types_folds_zeros(exported, tmp_path, exporter, opset, attention):
    path = exported(ExportSpec("bert", exporter, opset, attention, token_type_ids=False))
    assert "token_type_ids" not in [i.name for i in session(path).get_inputs()]
    model, log = fused_model(path)
    assert log.fused == 1
    node = eln_node(model)
    assert len(node.inputs) < 2 or node.inputs[1] is None          # no segment ids fed
    assert len(node.inputs) < 5 or node.inputs[4] is None          # token-type table folded away
    assert_parity(path, model, tmp_path, PADDED)


@pytest.mark.parametrize("exporter,opset,attention", LAYOUTS_USED)
def test_roberta_without_token_types_folds_its_buffer(exported, tmp_path, exporter, opset, attention):
    """RoBERTa reads token types from its all-zeros buffer gathered at its padding-aware positions (which depend
    on input_ids): every element is 0 whatever the ids, so row 0 is folded and nothing is fed as segments."""
    path = exported(ExportSpec("roberta", exporter, opset, attention, token_type_ids=False))
    assert "token_type_ids" not in [i.name for i in session(path).get_inputs()]
    model, log = fused_model(path)
    assert log.fused == 1
    node = eln_node(model)
    assert len(node.inputs) < 2 or node.inputs[1] is None          # no segment ids fed
    assert len(node.inputs) < 5 or node.inputs[4] is None          # token-type table folded away
    assert node.inputs[3].name.endswith("_row0")
    assert len(node.inputs) > 8 and node.inputs[8] is not None     # the per-token positions still fed
    assert_parity(path, model, tmp_path, PADDED)


def export_roberta_buffer(path, fill) -> str:
    """A TorchScript RoBERTa without a token_type_ids input whose token-type buffer is edited by ``fill``."""
    import torch

    model = build_model(tiny_config("roberta", "sdpa", type_vocab_size=3))
    with torch.no_grad():
        fill(model.embeddings.token_type_ids)
    return export_encoder(model, path, "torchscript", 14, token_type_ids=False)


def test_roberta_buffer_of_one_nonzero_row_folds_that_row(tmp_path):
    path = export_roberta_buffer(tmp_path / "ones.onnx", lambda buf: buf.fill_(2))
    model, log = fused_model(path)
    assert log.fused == 1
    assert eln_node(model).inputs[3].name.endswith("_row2")
    assert_parity(path, model, tmp_path, PADDED)


def test_roberta_buffer_not_all_equal_does_not_fuse(tmp_path):
    """Near-miss: token type 1 at position 4 of the buffer (positions 2.. are read): no single row to fold."""
    path = export_roberta_buffer(tmp_path / "mixed.onnx", lambda buf: buf[0, 4].fill_(1))
    names = [i.name for i in session(path).get_inputs()]
    zeros = export_roberta_buffer(tmp_path / "zeros.onnx", lambda buf: None)
    feed = feeds_for(names, MASKS["right"])     # the edit changes what the model computes
    assert not np.allclose(session(path).run(None, feed)[0], session(zeros).run(None, feed)[0], atol=1e-3)
    model, log = fused_model(path, explain=True)
    assert log.fused == 0
    assert ops(model)[ELN] == 0
    assert any("token type ids" in r and "not shown all equal" in r for r in log.refused), log.refused


def reverse_positions(model: ir.Model) -> None:
    """The position Gather reads a constant [[7, 6, ..., 0]] instead of arange(sequence)."""
    (gather,) = [n for n in model.graph if n.op_type == "Gather" and n.inputs[0].const_value is not None
                 and "position" in n.inputs[0].name]
    reversed_ids = _const(np.arange(8, dtype=np.int64)[::-1].copy()[None, :])
    reversed_ids.outputs[0].name = "reversed_position_ids"
    model.graph.insert_before(gather, reversed_ids)
    gather.replace_input_with(1, reversed_ids.outputs[0])


@pytest.mark.parametrize("exporter,opset,attention", LAYOUTS_USED)
def test_reversed_position_ids_do_not_fuse(exported, tmp_path, exporter, opset, attention):
    path = exported(ExportSpec("bert", exporter, opset, attention))
    model = prepare(ir.load(path))
    reverse_positions(model)
    edited = tmp_path / "edited.onnx"
    ir.save(model, edited)
    names = [i.name for i in session(path).get_inputs()]
    feed = feeds_for(names, MASKS["right"])     # sequence 8: the edited model is valid and differs
    assert not np.allclose(session(edited).run(None, feed)[0], session(path).run(None, feed)[0], atol=1e-3)
    run_fusion(layer_norm.FUSION, model, CTX)
    log = run_fusion(FUSION, model, CTX, explain=True)
    assert log.fused == 0
    assert ops(model)[ELN] == 0
    assert any("position ids" in reason for reason in log.refused), log.refused


# --- layouts of ONNX Runtime's own test graphs and older exporters (hand-built as those graphs are) ----------

HIDDEN, VOCAB, ROWS = 8, 30, 6


def _embedding_graph(positions: str = "expand", root: str = "ln", mask_index: bool = False,
                     sequence="seq", sum_output: bool = False, reshape_ids: bool = False,
                     mask_fill: int = 0) -> onnx.ModelProto:
    """word[ids] + positions -> LayerNormalization (or an already fused SkipLayerNormalization), then, with
    ``mask_index``, an ORT Attention whose mask index is ReduceSum(Cast(mask, int32), axis 1).

    positions: "expand"   pos[Expand(Unsqueeze(Range(0, S)), Shape(ids))]  (every row arange)
               "reversed" pos[Expand(Unsqueeze(S - 1 - Range(0, S)), Shape(ids))]  (a near-miss)
               "const"    a constant [S, H] added as it is (keras2onnx), S = ROWS
    sum_output: the embedding sum is a graph output too (GPT-2's residual reads it); reshape_ids: the word
    Gather reads Reshape(ids, [-1, S]) (PyTorch GPT-2). mask_fill: the counted mask is not an input but
    ConstantOfShape(Shape(ids), mask_fill) (ORT's embed_layer_norm_format9 builds all ones).
    """
    rng = np.random.default_rng(0)
    f32 = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    inits = [numpy_helper.from_array(f32(VOCAB, HIDDEN), "word"), numpy_helper.from_array(f32(ROWS, HIDDEN), "pos"),
             numpy_helper.from_array(1 + 0.1 * f32(HIDDEN), "gamma"),
             numpy_helper.from_array(0.1 * f32(HIDDEN), "beta"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array([0], np.int64), "axis0")]
    nodes = [helper.make_node("Gather", ["word", "ids"], ["w"])]
    if reshape_ids:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis_1"))
        nodes = [helper.make_node("Shape", ["ids"], ["ids_shape"]),
                 helper.make_node("Gather", ["ids_shape", "axis_1"], ["seq_1"], axis=0),
                 helper.make_node("Concat", ["minus_one", "seq_1"], ["flat"], axis=0),
                 helper.make_node("Reshape", ["ids", "flat"], ["ids_2d"]),
                 helper.make_node("Gather", ["word", "ids_2d"], ["w"])]
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "minus_one"))
    if positions == "const":
        nodes.append(helper.make_node("Identity", ["pos"], ["p"]))
    else:
        nodes += [helper.make_node("Shape", ["ids"], ["shape"]),
                  helper.make_node("Gather", ["shape", "one"], ["s"], axis=0),
                  helper.make_node("Range", ["zero", "s", "one"], ["range"])]
        if positions == "reversed":
            nodes += [helper.make_node("Sub", ["s", "one"], ["last"]),
                      helper.make_node("Sub", ["last", "range"], ["rev"])]
        nodes += [helper.make_node("Unsqueeze", ["rev" if positions == "reversed" else "range", "axis0"], ["row"]),
                  helper.make_node("Expand", ["row", "shape"], ["position_ids"]),
                  helper.make_node("Gather", ["pos", "position_ids"], ["p"])]
    if root == "ln":
        nodes += [helper.make_node("Add", ["w", "p"], ["sum"]),
                  helper.make_node("LayerNormalization", ["sum", "gamma", "beta"], ["emb"], axis=-1, epsilon=1e-5)]
    else:
        nodes.append(helper.make_node("SkipLayerNormalization", ["w", "p", "gamma", "beta"], ["emb"],
                                      domain=MS_DOMAIN, epsilon=1e-5))
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", sequence])]
    out = "emb"
    if mask_index:
        inits += [numpy_helper.from_array(0.3 * f32(HIDDEN, 3 * HIDDEN), "qkv_w"),
                  numpy_helper.from_array(0.1 * f32(3 * HIDDEN), "qkv_b"),
                  numpy_helper.from_array(np.array([1], np.int64), "axis1")]
        if mask_fill:
            fill = helper.make_tensor("fill", TensorProto.INT64, [1], [mask_fill])
            nodes += [helper.make_node("Shape", ["ids"], ["ids_shape_m"]),
                      helper.make_node("ConstantOfShape", ["ids_shape_m"], ["mask"], value=fill)]
        nodes += [helper.make_node("Cast", ["mask"], ["mask32"], to=TensorProto.INT32),
                  helper.make_node("ReduceSum", ["mask32", "axis1"], ["mask_index"], keepdims=0),
                  helper.make_node("Attention", ["emb", "qkv_w", "qkv_b", "mask_index"], ["att"], domain=MS_DOMAIN,
                                   num_heads=2)]
        if not mask_fill:
            inputs.append(helper.make_tensor_value_info("mask", TensorProto.INT64, ["batch", sequence]))
        out = "att"
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)]
    if sum_output:
        outputs.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "embeddings", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS_DOMAIN, 1)],
                             ir_version=8)


def _handmade_fused(proto: onnx.ModelProto, explain: bool = False):
    model = prepare(ir.serde.deserialize_model(proto))
    return model, run_fusion(FUSION, model, CTX, explain=explain)


def _assert_handmade_parity(proto: onnx.ModelProto, model: ir.Model, sequence: int = ROWS) -> None:
    """Batch 2, masks padded right and left (when the graph has a mask), ids in the vocabulary."""
    original, fused = (ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
                       for m in (proto, ir.serde.serialize_model(model)))
    names = {i.name for i in original.get_inputs()}
    ids = np.random.default_rng(3).integers(0, VOCAB, (2, sequence))
    for padded in ("right", "left"):
        row = [1] * (sequence - 2) + [0] * 2
        mask = np.array([[1] * sequence, row if padded == "right" else row[::-1]], dtype=np.int64)
        feeds = {"ids": ids, "mask": mask} if "mask" in names else {"ids": ids}
        for got, want in zip(fused.run(None, feeds), original.run(None, feeds), strict=True):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_broadcast_arange_positions_and_reduce_sum_mask_index_fuse():
    """ORT's embed_layer_norm_format8 layout: Expand(Unsqueeze(Range(0, S)), [B, S]) positions, the mask index
    of an existing Attention computed by ReduceSum: ELN takes the mask, its mask_index replaces the ReduceSum."""
    proto = _embedding_graph("expand", mask_index=True)
    model, log = _handmade_fused(proto)
    assert log.fused == 1
    counts = ops(model)
    assert counts[ELN] == 1 and counts[("", "ReduceSum")] == 0
    node = eln_node(model)
    assert graph_input_behind(node.inputs[7], model) == "mask"
    (attention,) = [n for n in model.graph if n.op_type == "Attention"]
    assert attention.inputs[3] is node.outputs[1]
    _assert_handmade_parity(proto, model)


def test_embeddings_summed_by_a_skip_layer_norm_fuse():
    """GPT-2 embedding graphs of ORT's tests: the word + position sum already fused as SkipLayerNormalization."""
    proto = _embedding_graph("expand", root="sln")
    for model_type in ("gpt2", "bert"):     # the coverage census sees that embedding block (not "nothing to fuse")
        assert census(prepare(ir.serde.deserialize_model(proto)), model_type).counts()["embedding"] == 1
    model, log = _handmade_fused(proto)
    assert log.fused == 1 and ops(model)[(MS_DOMAIN, "SkipLayerNormalization")] == 0
    _assert_handmade_parity(proto, model)


def test_constant_position_rows_fuse_when_the_sequence_is_static():
    proto = _embedding_graph("const", sequence=ROWS)
    model, log = _handmade_fused(proto)
    assert log.fused == 1 and ops(model)[ELN] == 1
    _assert_handmade_parity(proto, model)


@pytest.mark.parametrize("positions,sequence,says", [
    ("reversed", "seq", "position ids are not arange"),          # every row S-1..0: not ELN's positions
    ("const", "seq", "not a static dim equal"),                   # rows added to a sequence of any length
])
def test_handmade_near_misses_do_not_fuse(positions, sequence, says):
    proto = _embedding_graph(positions, sequence=sequence)
    model, log = _handmade_fused(proto, explain=True)
    assert log.fused == 0 and ops(model)[ELN] == 0
    assert any(says in reason for reason in log.refused), log.refused
    _assert_handmade_parity(proto, model)      # untouched, still the original function


def test_embedding_sum_read_elsewhere_is_elns_third_output():
    """GPT-2 (PyTorch 1.5, ORT's gpt2_past_mask_one_layer): ids through Reshape(ids, [-1, S]), the word +
    position sum also read by the residual (here: a graph output) -> ELN's embedding_sum output replaces it."""
    proto = _embedding_graph("expand", sum_output=True, reshape_ids=True)
    model, log = _handmade_fused(proto)
    assert log.fused == 1 and ops(model)[ELN] == 1 and ops(model)[("", "LayerNormalization")] == 0
    node = eln_node(model)
    assert node.outputs[2] is model.graph.outputs[1]
    _assert_handmade_parity(proto, model)


@pytest.mark.parametrize("fill", [1, 2])
def test_mask_built_from_the_ids_shape(fill):
    """All ones from ConstantOfShape(Shape(ids)) (ORT's format9) becomes ELN's mask; a tensor of 2s (a near-miss:
    not a 0/1 mask) leaves the ReduceSum as it is. Both compute the original."""
    proto = _embedding_graph("expand", mask_index=True, mask_fill=fill)
    model, log = _handmade_fused(proto)
    assert log.fused == 1 and ops(model)[ELN] == 1
    assert ops(model)[("", "ReduceSum")] == (0 if fill == 1 else 1)
    _assert_handmade_parity(proto, model)
