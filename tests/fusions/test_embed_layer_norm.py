"""Embeddings + LayerNorm -> com.microsoft EmbedLayerNormalization: every family on two layouts, BERT
without token types (constant zeros folded), parity under right and left padding at batch 3, and a
near-miss (constant reversed position ids) that must not fuse."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from test_attention import MASKS, _const, assert_parity, feeds_for, graph_input_behind, session
from test_gelu import CTX, ops

from mlstep.export import ENCODER_FAMILIES, ExportSpec
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
