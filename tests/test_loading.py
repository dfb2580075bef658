"""Reading what ONNX Runtime reads (mlstep.optimizer.io) and synthesizing parity inputs from what the graph says
(mlstep.validate.inputs): each legal-but-unusual spelling of ONNX Runtime's own test graphs, built small, loaded,
prepared, saved and run in ONNX Runtime against the original."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_cli import assert_bad_input, mlstep

from mlstep.errors import BadInputError
from mlstep.optimizer import io
from mlstep.optimizer.passes import prepare
from mlstep.validate.inputs import synthesize_inputs


def _save(proto: onnx.ModelProto, path: Path) -> Path:
    path.write_bytes(proto.SerializeToString())     # as written, no checker in between
    return path


def _run(path_or_proto, feeds: dict) -> list[np.ndarray]:
    source = path_or_proto.SerializeToString() if isinstance(path_or_proto, onnx.ModelProto) else str(path_or_proto)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"]).run(None, feeds)


def _prepared_copy(path: Path, tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    loaded = io.load_with_repairs(path)
    prepare(loaded.model)
    out = tmp_path / "prepared.onnx"
    io.save(loaded.model, out)
    return out, loaded.repairs


def _model(nodes, inputs, outputs, inits=(), opset=("", 13), ir_version=8) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(*opset)], ir_version=ir_version)


def test_default_domain_spelled_ai_onnx_is_read_as_the_default_domain(tmp_path):
    """Cast's 'to' and Split's int64 sizes are read right only when the import is the default domain."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.INT64, None) for n in ("y0", "y1")]
    proto = _model([helper.make_node("Cast", ["x"], ["xi"], to=TensorProto.INT64),
                    helper.make_node("Split", ["xi", "sizes"], ["y0", "y1"], axis=1)],
                   [x], outs, [numpy_helper.from_array(np.array([1, 3], np.int64), "sizes")], opset=("ai.onnx", 16))
    source = _save(proto, tmp_path / "ai_onnx.onnx")
    out, repairs = _prepared_copy(source, tmp_path)
    assert any("'ai.onnx'" in r for r in repairs), repairs
    saved = onnx.load(str(out))
    assert {o.domain: o.version for o in saved.opset_import}.get("") == 16
    feeds = {"x": np.arange(8, dtype=np.float32).reshape(2, 4)}
    for got, want in zip(_run(out, feeds), _run(source, feeds)):
        np.testing.assert_array_equal(got, want)


def test_minus_one_dims_are_unknown_and_shape_reads_stay_computed(tmp_path):
    """Inputs declared [-1, -1]: the dims are unknown, never the size -1, so Shape(Cast(ids)) is not rebased
    into a constant [-1, -1] (which ORT would then feed to a Reshape)."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [-1, -1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    proto = _model([helper.make_node("Cast", ["ids"], ["f"], to=TensorProto.FLOAT),
                    helper.make_node("Shape", ["f"], ["shape"]),
                    helper.make_node("Add", ["f", "one"], ["g"]),
                    helper.make_node("Reshape", ["g", "shape"], ["y"])],
                   [ids], [y], [numpy_helper.from_array(np.array(1.0, np.float32), "one")])
    source = _save(proto, tmp_path / "minus_one.onnx")
    loaded = io.load_with_repairs(source)
    assert any("-1" in r for r in loaded.repairs), loaded.repairs
    assert all(not isinstance(d, int) for d in loaded.model.graph.inputs[0].shape)
    out, _ = _prepared_copy(source, tmp_path)
    for shape in ((2, 3), (1, 7)):
        feeds = {"ids": np.ones(shape, np.int64)}
        np.testing.assert_array_equal(_run(out, feeds)[0], _run(source, feeds)[0])
    cases = synthesize_inputs(loaded.model, batch=2, sequence=5)
    assert cases[0].feeds["ids"].shape == (2, 5)


def _duplicated_constants(last_maker: str = "Constant") -> onnx.ModelProto:
    """y = x / c where two nodes define 'c' (12, then 2 at the end of the node list, out of order)."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    first = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(12.0, np.float32)))
    if last_maker == "Constant":
        last = helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.array(2.0, np.float32)))
    else:
        last = helper.make_node("Identity", ["x"], ["c"])
    return _model([first, helper.make_node("Div", ["x", "c"], ["y"]), last], [x], [y])


def test_duplicated_constant_names_keep_the_last_as_onnx_runtime_does(tmp_path):
    source = _save(_duplicated_constants(), tmp_path / "duplicated.onnx")
    out, repairs = _prepared_copy(source, tmp_path)
    assert any("several Constant nodes" in r for r in repairs), repairs
    assert any("topological" in r for r in repairs), repairs
    feeds = {"x": np.array([4.0, 6.0], np.float32)}
    want = _run(source, feeds)[0]
    np.testing.assert_array_equal(want, [2.0, 3.0])       # ORT reads the last 'c' (2)
    np.testing.assert_array_equal(_run(out, feeds)[0], want)


def test_a_name_defined_by_two_computing_nodes_is_bad_input(tmp_path):
    source = _save(_duplicated_constants(last_maker="Identity"), tmp_path / "clash.onnx")
    with pytest.raises(BadInputError, match="defined by several nodes"):
        io.load(source)


def test_if_bodies_are_left_intact(tmp_path):
    """tf2onnx 1.6 wraps a branch in If with Identity nodes ending each body (onnx_ir's IdentityEliminationPass
    fails on them); the main graph's Identity goes (its uses inside the bodies rewired), and the bodies keep their
outputs and compute the same."""
    def branch(name, scale):
        return helper.make_graph(
            [helper.make_node("Mul", ["h", f"{name}_k"], [f"{name}_m"]),
             helper.make_node("Identity", [f"{name}_m"], [f"{name}_out"])], name, [],
            [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, ["n"])],
            [numpy_helper.from_array(np.array(scale, np.float32), f"{name}_k")])
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])
    flag = helper.make_tensor_value_info("flag", TensorProto.BOOL, [])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    proto = _model([helper.make_node("Identity", ["x"], ["h"]),
                    helper.make_node("If", ["flag"], ["y"], then_branch=branch("then", 2.0),
                                     else_branch=branch("else", 3.0))], [x, flag], [y], opset=("", 11), ir_version=6)
    source = _save(proto, tmp_path / "if.onnx")
    out, _ = _prepared_copy(source, tmp_path)
    saved = onnx.load(str(out))
    assert [n.op_type for n in saved.graph.node] == ["If"]
    (if_node,) = saved.graph.node
    for body in (a.g for a in if_node.attribute):     # each body still computes its own output
        assert [o.name for o in body.output] == [f"{body.name}_out"]
        assert "Mul" in [n.op_type for n in body.node]
    for value in (True, False):
        feeds = {"x": np.array([1.0, 2.0], np.float32), "flag": np.array(value)}
        np.testing.assert_array_equal(_run(out, feeds)[0], _run(source, feeds)[0])


def _shared_ids_model(rows=(101, 100, 10), seq: int | str = "s") -> onnx.ModelProto:
    """One ``ids`` input indexing tables of several row counts, through Slice (GPT-2 with past: the last token),
    Reshape(-1, S) (PyTorch GPT-2) and Cast."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", seq])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((r, 4)).astype(np.float32), f"t{r}") for r in rows]
    inits += [numpy_helper.from_array(np.array([-1, 4], np.int64), "flat"),
              numpy_helper.from_array(np.array([-4], np.int64), "start"),
              numpy_helper.from_array(np.array([2 ** 62], np.int64), "end"),
              numpy_helper.from_array(np.array([1], np.int64), "axis")]
    nodes = [helper.make_node("Slice", ["ids", "start", "end", "axis"], ["last4"]),
             helper.make_node("Reshape", ["last4", "flat"], ["ids2"]),
             helper.make_node("Cast", ["ids2"], ["ids32"], to=TensorProto.INT32)]
    for i, r in enumerate(rows):
        nodes.append(helper.make_node("Gather", [f"t{r}", "ids32" if i % 2 else "ids2"], [f"g{r}"]))
    nodes.append(helper.make_node("Sum", [f"g{r}" for r in rows], ["y"]))
    return _model(nodes, [ids], [y], inits)


def test_ids_are_bounded_by_the_smallest_table_they_reach(tmp_path):
    proto = _shared_ids_model()
    model = ir.serde.deserialize_model(proto)
    cases = synthesize_inputs(model, batch=2, sequence=8, seed=1)
    for case in cases:
        assert case.feeds["ids"].max() < 10
        _run(proto, case.feeds)                  # the original runs on them: no index out of range


def test_position_table_bounds_the_sequence():
    """Positions Gather(pos, Range(0, S)): a 4-row table accepts sequences up to 4 (asked for 8)."""
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(np.ones((4, 2), np.float32), "pos"),
             numpy_helper.from_array(np.ones((50, 2), np.float32), "word"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(1, np.int64), "one")]
    proto = _model([helper.make_node("Shape", ["ids"], ["shape"]),
                    helper.make_node("Gather", ["shape", "one"], ["s"], axis=0),
                    helper.make_node("Range", ["zero", "s", "one"], ["positions"]),
                    helper.make_node("Gather", ["pos", "positions"], ["p"]),
                    helper.make_node("Gather", ["word", "ids"], ["w"]),
                    helper.make_node("Add", ["w", "p"], ["y"])], [ids], [y], inits)
    cases = synthesize_inputs(ir.serde.deserialize_model(proto), batch=2, sequence=8)
    assert cases[0].feeds["ids"].shape == (2, 4)
    for case in cases:
        _run(proto, case.feeds)


def _huge_input_model(tmp_path: Path) -> Path:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [10 ** 6, 10 ** 6])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    return _save(_model([helper.make_node("Relu", ["x"], ["y"])], [x], [y]), tmp_path / "huge.onnx")


def test_a_declared_size_too_large_to_synthesize_is_bad_input_before_allocating(tmp_path):
    model = io.load(_huge_input_model(tmp_path))
    start = time.perf_counter()
    with pytest.raises(BadInputError, match="would be synthesized as"):
        synthesize_inputs(model)
    assert time.perf_counter() - start < 5


def test_cli_a_declared_size_too_large_is_exit_2_and_nothing_written(tmp_path):
    output = tmp_path / "out"
    proc = mlstep("optimize", _huge_input_model(tmp_path), "--output", output, "--skip-benchmark")
    assert_bad_input(proc, output, "would be synthesized as")
