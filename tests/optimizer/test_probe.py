"""Mask probes at the user's sequence length: a causal (or padding) mask that is right at every probed length but
the user's is accepted by the fixed probes and refused once the user's length is probed too. Graphs built here
with onnx.helper; the bias is switched off (all zeros) at one sequence length only."""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from mlstep.optimizer.probe import causal_mask_source, padding_mask_source, padding_probes


def _bias_graph(causal: bool, off_at: int) -> ir.Model:
    """bias[b, 0, i, j] = 0 where mask[b, j] (and j <= i when causal), else the lowest float (as transformers
    fills: a query that sees nothing then gets the fused op's row); all zeros when S == off_at."""
    n = helper.make_node
    c = lambda name, value, dtype=np.int64: numpy_helper.from_array(np.array(value, dtype), name)  # noqa: E731
    inits = [c("one", 1), c("axes0", [0]), c("axes12", [1, 2]), c("at", off_at), c("neg", np.finfo(np.float32).min, np.float32),
             c("zero", 0.0, np.float32), c("one_f", 1.0, np.float32)]
    nodes = [n("Shape", ["mask"], ["shape"]), n("Gather", ["shape", "one"], ["s"], axis=0),
             n("Unsqueeze", ["mask", "axes12"], ["m4"]), n("Cast", ["m4"], ["keep"], to=TensorProto.BOOL)]
    if causal:
        nodes += [n("Unsqueeze", ["s", "axes0"], ["s1"]), n("Concat", ["s1", "s1"], ["ss"], axis=0),
                  n("ConstantOfShape", ["ss"], ["square"], value=helper.make_tensor("v", TensorProto.FLOAT, [1],
                                                                                        [1.0])),
                  n("Trilu", ["square"], ["lower"], upper=0), n("Cast", ["lower"], ["tri"], to=TensorProto.BOOL),
                  n("And", ["keep", "tri"], ["visible"])]
    else:
        nodes.append(n("Identity", ["keep"], ["visible"]))
    nodes += [n("Where", ["visible", "zero", "neg"], ["bias_on"]), n("Mul", ["bias_on", "zero"], ["bias_off"]),
              n("Equal", ["s", "at"], ["is_at"]), n("Where", ["is_at", "bias_off", "bias_on"], ["bias"])]
    graph = helper.make_graph(nodes, "bias", [helper.make_tensor_value_info("mask", TensorProto.INT64, ["B", "S"])],
                              [helper.make_tensor_value_info("bias", TensorProto.FLOAT, None)], inits)
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))


def _bias(model: ir.Model) -> ir.Value:
    return model.graph.outputs[0]


@pytest.mark.parametrize("causal", [False, True])
def test_a_mask_wrong_only_at_the_users_length_is_refused_there(causal):
    probe = causal_mask_source if causal else padding_mask_source
    model = _bias_graph(causal, off_at=12)
    source, _, reason = probe(model, _bias(model))
    assert source is not None and source.name == "mask", reason        # the fixed probes do not see it
    source, _, reason = probe(model, _bias(model), (12,))
    assert source is None and "does not block" in reason
    source, _, reason = probe(model, _bias(model), (8, 16))              # other user lengths: still fine
    assert source is not None, reason


def test_user_lengths_are_added_once():
    assert padding_probes(()) == padding_probes((6, 9, 70, 1))
    assert padding_probes((12, 12, 8))[-2:] == ((3, 12), (3, 8))
