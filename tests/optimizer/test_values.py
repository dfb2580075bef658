"""The value analysis (values.py): constants folded through shape arithmetic (the runtime attention scale of
transformers 4.x exports), dims equal by the graph's semantics whatever their names, Range with offsets."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

sys.path.insert(0, str(Path(__file__).parent.parent / "fusions"))
from wild_exports import export_encoder_runtime_scale  # noqa: E402

from mlstep.optimizer.passes import prepare  # noqa: E402
from mlstep.optimizer.values import facts  # noqa: E402


@pytest.fixture(scope="module")
def bert_runtime_scale(tmp_path_factory) -> Path:
    return export_encoder_runtime_scale("bert", 17, tmp_path_factory.mktemp("values") / "bert-rt.onnx")


def scale_muls(model: ir.Model) -> list[ir.Node]:
    """The Mul(Q, sqrt(s)) / Mul(K^T, sqrt(s)) feeding the scores MatMuls."""
    return [v.producer() for n in model.graph if n.op_type == "MatMul" for v in n.inputs
            if v.producer() is not None and v.producer().op_type == "Mul"
            and v.producer().inputs[1].producer() is not None and v.producer().inputs[1].producer().op_type == "Sqrt"]


def test_runtime_attention_scale_is_a_constant(bert_runtime_scale):
    model = prepare(ir.load(bert_runtime_scale))
    muls = scale_muls(model)
    assert len(muls) == 4                                   # Q and K^T in each of 2 layers
    assert all(m.inputs[1].const_value is None for m in muls)    # not literal: computed from Shape(Q)
    known = facts(model.graph)
    for mul in muls:
        assert known.scalar(mul.inputs[1]) == pytest.approx(8 ** -0.25, rel=1e-12)   # sqrt(1 / sqrt(8))


def test_library_folding_leaves_the_runtime_scale(bert_runtime_scale):
    """Why values.py folds it: onnxscript's constant folding with ONNX shape inference does not."""
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import fold_constants_ir

    model = ir.load(bert_runtime_scale)
    common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    fold_constants_ir(model, onnx_shape_inference=True, input_size_limit=1024, output_size_limit=1024)
    muls = scale_muls(model)
    assert len(muls) == 4 and all(m.inputs[1].const_value is None for m in muls)


def _model(nodes, inputs, outputs=None, inits=()):
    outputs = outputs or [helper.make_tensor_value_info(nodes[-1].output[0], TensorProto.FLOAT, None)]
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _value(model: ir.Model, name: str) -> ir.Value:
    for v in model.graph.inputs:
        if v.name == name:
            return v
    return next(o for n in model.graph for o in n.outputs if o.name == name)


def test_separately_named_dims_meet_through_a_broadcast():
    """dynamo's s33 / s6, tf2onnx's unk__N and an unnamed dim: one dim once an Add relates them."""
    f = helper.make_tensor_value_info
    model = _model([helper.make_node("Add", ["x", "y"], ["z"]), helper.make_node("Add", ["z", "w"], ["u"])],
                   [f("x", TensorProto.FLOAT, ["s33", "unk__302", 4]), f("y", TensorProto.FLOAT, ["s6", None, 4]),
                    f("w", TensorProto.FLOAT, ["batch", "sequence", 4]),
                    f("other", TensorProto.FLOAT, ["s7", "sequence", 4])])
    known = facts(model.graph)
    x, y, w, other = (_value(model, n) for n in ("x", "y", "w", "other"))
    assert known.same_shape(x, y) and known.same_shape(x, w)
    assert known.same_dim(known.dims(y)[0], "batch")
    assert not known.same_shape(x, other)                   # nothing relates s7 to the batch


def test_contraction_and_concat_make_dims_equal():
    f = helper.make_tensor_value_info
    model = _model([helper.make_node("MatMul", ["a", "b"], ["c"]),
                    helper.make_node("Concat", ["c", "d"], ["e"], axis=1)],
                   [f("a", TensorProto.FLOAT, ["m", "k1"]), f("b", TensorProto.FLOAT, ["k2", "n"]),
                    f("d", TensorProto.FLOAT, ["m2", "n2"])])
    known = facts(model.graph)
    assert known.same_dim("k1", "k2")
    assert known.same_dim("m", "m2")                        # Concat on axis 1: axis 0 equal
    assert not known.same_dim("n", "n2")                    # the concatenated axis is not
    assert known.dims(_value(model, "e")) == ["m", "n+n2"] or known.dims(_value(model, "e"))[1] == "n+n2"


def test_range_with_a_past_offset_has_sequence_entries():
    """GPT-2 with past (Optimum): positions = Range(past, past + sequence); the mask dim is spelled
    "past_sequence_length + sequence_length" (with spaces) and is the same dim as past + sequence."""
    f = helper.make_tensor_value_info
    ints = lambda name, vals: numpy_helper.from_array(np.array(vals, np.int64), name)  # noqa: E731
    nodes = [helper.make_node("Shape", ["past_key"], ["ps"]), helper.make_node("Gather", ["ps", "two"], ["past"]),
             helper.make_node("Shape", ["input_ids"], ["is"]), helper.make_node("Gather", ["is", "one"], ["seq"]),
             helper.make_node("Add", ["past", "seq"], ["total"]),
             helper.make_node("Range", ["past", "total", "step"], ["positions"]),
             helper.make_node("Concat", ["past_key", "key"], ["present"], axis=2),
             helper.make_node("Shape", ["present"], ["pres_shape"]),
             helper.make_node("Gather", ["pres_shape", "two"], ["present_len"]),
             helper.make_node("Cast", ["present_len"], ["present_len_f"], to=TensorProto.FLOAT),
             helper.make_node("Sqrt", ["present_len_f"], ["root"])]
    model = _model(nodes, [f("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
                           f("attention_mask", TensorProto.INT64,
                             ["batch_size", "past_sequence_length + sequence_length"]),
                           f("past_key", TensorProto.FLOAT, ["batch_size", 4, "past_sequence_length", 8]),
                           f("key", TensorProto.FLOAT, ["batch_size", 4, "sequence_length", 8])],
                   inits=[ints("two", 2), ints("one", 1), ints("step", 1)])
    known = facts(model.graph)
    assert known.dims(_value(model, "positions")) == ["sequence_length"]
    mask_total = known.dims(_value(model, "attention_mask"))[1]
    assert known.same_dim(known.dims(_value(model, "present"))[2], mask_total)
    assert known.constant(_value(model, "root")) is None    # sqrt of a dynamic length is not a constant


def test_numbers_follow_onnx_semantics():
    """Integer Div truncates; Cast to float then Sqrt/Div folds in floating point."""
    f = helper.make_tensor_value_info
    ints = lambda name, vals: numpy_helper.from_array(np.array(vals, np.int64), name)  # noqa: E731
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Slice", ["s", "minus_one", "big"], ["last"]),
             helper.make_node("Div", ["last", "three"], ["third"]),
             helper.make_node("Cast", ["last"], ["last_f"], to=TensorProto.FLOAT),
             helper.make_node("Sqrt", ["last_f"], ["root"]),
             helper.make_node("Div", ["one_f", "root"], ["scale"])]
    model = _model(nodes, [f("x", TensorProto.FLOAT, ["batch", 4, "sequence", 8])],
                   inits=[ints("minus_one", [-1]), ints("big", [2**62]), ints("three", [3]),
                          numpy_helper.from_array(np.array([1.0], np.float32), "one_f")])
    known = facts(model.graph)
    assert known.constant(_value(model, "third")).tolist() == [2]
    assert known.scalar(_value(model, "scale")) == pytest.approx(1 / np.sqrt(8))


def _uniform_graph(buffer: np.ndarray, cast_to: int = TensorProto.INT64) -> ir.Model:
    """RoBERTa's token types without an input: its [1, 10] buffer expanded to [batch, 10] and gathered at
    per-token positions computed from input_ids, then Slice / Unsqueeze / Squeeze / Cast."""
    nodes = [
        helper.make_node("Shape", ["input_ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "zero"], ["batch"], axis=0),
        helper.make_node("Unsqueeze", ["batch", "axes0"], ["batch1"]),
        helper.make_node("Concat", ["batch1", "minus1"], ["target"], axis=0),
        helper.make_node("Expand", ["buffer", "target"], ["expanded"]),
        helper.make_node("Add", ["input_ids", "two"], ["positions"]),
        helper.make_node("GatherElements", ["expanded", "positions"], ["picked"], axis=1),
        helper.make_node("Slice", ["picked", "starts", "ends", "axes1"], ["sliced"]),
        helper.make_node("Unsqueeze", ["sliced", "axes0"], ["u"]),
        helper.make_node("Squeeze", ["u", "axes0"], ["s"]),
        helper.make_node("Cast", ["s"], ["token_types"], to=cast_to),
        helper.make_node("ConstantOfShape", ["shape"], ["filled"],
                         value=numpy_helper.from_array(np.array([3], dtype=np.int64))),
        helper.make_node("Where", ["cond", "filled", "filled"], ["where"]),
    ]
    inits = [numpy_helper.from_array(a, n) for n, a in (
        ("buffer", buffer), ("zero", np.array(0, np.int64)), ("axes0", np.array([0], np.int64)),
        ("minus1", np.array([-1], np.int64)), ("two", np.array(2, np.int64)), ("starts", np.array([0], np.int64)),
        ("ends", np.array([4], np.int64)), ("axes1", np.array([1], np.int64)))]
    graph = helper.make_graph(
        nodes, "uniform",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, ["batch", "sequence"])],
        [helper.make_tensor_value_info("token_types", cast_to, None),
         helper.make_tensor_value_info("where", TensorProto.INT64, None)], inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_uniform_through_selecting_ops_whatever_the_indices():
    model = _uniform_graph(np.zeros((1, 10), np.int64))
    known, values = facts(model.graph), {v.name: v for v in model.graph.outputs}
    assert known.uniform(values["token_types"]) == 0
    assert known.uniform(values["where"]) == 3                 # ConstantOfShape, both Where branches
    assert known.uniform(model.graph.inputs[0]) is None       # a graph input: anything


def test_uniform_cast_converts_and_a_single_different_element_is_not_uniform():
    model = _uniform_graph(np.full((1, 10), 2, np.int64), cast_to=TensorProto.FLOAT)
    assert facts(model.graph).uniform(model.graph.outputs[0]) == 2.0
    mixed = np.zeros((1, 10), np.int64)
    mixed[0, 9] = 1
    model = _uniform_graph(mixed)
    assert facts(model.graph).uniform(model.graph.outputs[0]) is None
