"""TF BERT exported by tf2onnx (``from_function``, opset 13/17) and Keras BERT (``from_keras``): every committed
fixture fully fused (Attention per layer, EmbedLayerNormalization, SkipLayerNormalization 2 per layer, a
Gelu per layer), model type detected, fp32 and fp16 parity at batch 3 with masks padded right, left and
holed; a mask that is not a padding mask (fed as attention_bias, not as a mask); near-misses (a GlobalAveragePool
over more than the last axis, an unflatten that does not restore the input's leading dimensions) that must not fuse.

The fixtures are made by tests/tf_fixtures/make_fixtures.py in its own pinned environment; this suite only
reads them (TensorFlow is never installed here).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper
from test_attention import MASKS, graph_input_behind

from mlstep.optimizer import OptimizeOptions, optimize, optimize_file
from mlstep.optimizer.fusions._base import MS_DOMAIN, FusionContext, run_fusion
from mlstep.optimizer.fusions import layer_norm_tf, tensordot
from mlstep.optimizer.io import save
from mlstep.precision import to_fp16
from mlstep.validate import Case, check_parity

FIXTURE_DIR = Path(__file__).resolve().parent.parent / "tf_fixtures"
FIXTURES = sorted(FIXTURE_DIR.glob("*.onnx"))
LAYERS = 2
VOCAB = 99


def fixture_id(path: Path) -> str:
    return path.stem


def heads_of(path: Path) -> int:
    return int(re.search(r"_h(\d+)_", path.name).group(1))


def cases_for(path: Path) -> list[Case]:
    """Batch 3, sequence 8: right-, left-padded and holed masks; ids and token types in range, in the
    inputs' own integer type (int32 or int64, as the exporter made them)."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    dtypes = {i.name: np.int32 if i.type == "tensor(int32)" else np.int64 for i in session.get_inputs()}
    rng = np.random.default_rng(0)
    cases = []
    for kind, mask in MASKS.items():
        mask = np.array(mask)
        feeds = {"input_ids": rng.integers(0, VOCAB, mask.shape), "attention_mask": mask,
                 "token_type_ids": rng.integers(0, 2, mask.shape)}
        cases.append(Case(kind, {k: v.astype(dtypes[k]) for k, v in feeds.items() if k in dtypes}))
    return cases


def counts(model: ir.Model) -> Counter:
    return Counter((n.domain, n.op_type) for n in model.graph)


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    """fused(path) -> (OptimizeResult, saved fp32 path), made once per fixture."""
    cache = {}

    def get(path: Path):
        if path not in cache:
            result = optimize_file(path, OptimizeOptions(verbose=True))
            out = tmp_path_factory.mktemp(path.stem) / "model.onnx"
            save(result.model, out)
            cache[path] = (result, out)
        return cache[path]

    return get


def test_fixtures_are_committed_and_small():
    names = {p.stem for p in FIXTURES}
    assert len(FIXTURES) >= 5, names
    assert any(n.startswith("bert_tf_fn_op13") for n in names) and any(n.startswith("bert_tf_fn_op17") for n in names)
    assert any(n.startswith("bert_keras") for n in names)
    assert all(p.stat().st_size < 1_000_000 for p in FIXTURES)
    assert (FIXTURE_DIR / "VERSIONS.txt").read_text().count("tf2onnx==1.16.1") == 1


@pytest.mark.parametrize("path", FIXTURES, ids=fixture_id)
def test_fully_fused(fused, path):
    result, _ = fused(path)
    model = result.model
    c = counts(model)
    refused = result.summary_lines()
    assert result.model_type == ("bert_keras" if path.name.startswith("bert_keras") else "bert_tf")
    assert result.detected.num_heads == heads_of(path) and result.detected.hidden_size == 32
    assert c[(MS_DOMAIN, "Attention")] == LAYERS, refused
    assert c[(MS_DOMAIN, "EmbedLayerNormalization")] == 1, refused
    assert c[(MS_DOMAIN, "SkipLayerNormalization")] == 2 * LAYERS, refused
    assert c[(MS_DOMAIN, "BiasGelu")] + c[(MS_DOMAIN, "Gelu")] + c[(MS_DOMAIN, "FastGelu")] == LAYERS, refused
    for op in ("Softmax", "Erf", "GlobalAveragePool", "ReduceMean", "Sqrt", "LayerNormalization"):
        assert c[("", op)] == 0, (op, refused)
    for node in model.graph:
        if node.op_type == "Attention":
            assert node.attributes.get_int("num_heads") == heads_of(path)
            # the raw 2-D mask (int32), not TF's (1 - mask) * -10000 bias
            assert len(node.inputs) == 4 and graph_input_behind(node.inputs[3], model) == "attention_mask"
        if node.op_type == "EmbedLayerNormalization":
            assert graph_input_behind(node.inputs[0], model) == "input_ids"
            with_tt = "_tt_" in path.name
            segment = node.inputs[1] if len(node.inputs) > 1 else None
            assert (segment is not None and graph_input_behind(segment, model) == "token_type_ids") == with_tt


@pytest.mark.parametrize("path", FIXTURES, ids=fixture_id)
def test_parity_fp32(fused, path):
    _, out = fused(path)
    parity = check_parity(path, out, "fp32", cases_for(path))   # atol 1e-4 + rtol 1e-3, both outputs
    assert parity.passed, parity
    assert set(parity.per_output) == {o.name for o in onnx.load(str(path)).graph.output}


@pytest.mark.parametrize("path", FIXTURES, ids=fixture_id)
def test_parity_fp16(fused, path, tmp_path):
    result, _ = fused(path)
    out = tmp_path / "fp16.onnx"
    save(to_fp16(result.model), out)
    parity = check_parity(path, out, "fp16", cases_for(path))   # 2e-2 of max |ref|
    assert parity.passed, parity


@pytest.mark.parametrize("path", FIXTURES, ids=fixture_id)
def test_ort_prepass_then_fused(path, tmp_path):
    """--opt-level 2: ORT rewrites the shape arithmetic first (Slices of a shape become a Split)."""
    result = optimize_file(path, OptimizeOptions(opt_level=2))
    assert result.fusions == {"Attention": LAYERS, "BiasGelu": LAYERS, "EmbedLayerNormalization": 1,
                              "SkipLayerNormalization": 2 * LAYERS}
    out = tmp_path / "model.onnx"
    save(result.model, out)
    assert check_parity(path, out, "fp32", cases_for(path)).passed


def test_explicit_model_type_is_honoured():
    path = FIXTURE_DIR / "bert_tf_fn_op13_h4_tt_i32.onnx"
    result = optimize(ir.load(path), OptimizeOptions(model_type="bert_keras"))
    assert result.model_type == "bert_keras"
    assert result.fusions.get("Attention") == LAYERS


# --- near-misses -----------------------------------------------------------------------------------

def test_mask_that_is_not_a_padding_mask_is_not_fed_as_one(tmp_path):
    """(1 - mask) * -10000 with the 1 changed to 0: attended tokens get -10000, padded ones 0. Not a padding mask:
    Attention must not take the raw mask; the bias (one row per key) goes in as it is, as attention_bias, and the
    result still computes the original."""
    path = FIXTURE_DIR / "bert_tf_fn_op13_h4_tt_i32.onnx"
    proto = onnx.load(str(path))
    (sub,) = [n for n in proto.graph.node if n.op_type == "Sub" and n.name.endswith("bert/Sub")]
    one = next(t for t in proto.graph.initializer if t.name == sub.input[0])
    one.CopyFrom(onnx.numpy_helper.from_array(np.array(0.0, dtype=np.float32), one.name))
    edited = tmp_path / "edited.onnx"
    onnx.save(proto, edited)
    result = optimize_file(edited, OptimizeOptions(verbose=True))
    attentions = [n for n in result.model.graph if n.op_type == "Attention"]
    assert len(attentions) == LAYERS
    assert all(n.inputs[3] is None and n.inputs[5] is not None for n in attentions)   # no mask index; the bias
    assert result.fusions["EmbedLayerNormalization"] == 1 and result.fusions["SkipLayerNormalization"] == 4
    out = tmp_path / "fused.onnx"
    save(result.model, out)
    assert check_parity(edited, out, "fp32", cases_for(edited)).passed


def _tf_layer_norm_graph(shape: list, mean: str = "pool", axis: int = -1, diff: str = "x-mean") -> onnx.ModelProto:
    """TF's batchnorm-form LayerNorm on an input of ``shape``, its means as tf2onnx's GlobalAveragePool
    or as ReduceMean over ``axis``; the squared difference as (x - mean)^2 or, as keras2onnx writes it at
    opset 10, (mean - x)^2."""
    hidden = shape[-1]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(np.array(1e-12, dtype=np.float32), "eps"),
             onnx.numpy_helper.from_array((1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32), "gamma"),
             onnx.numpy_helper.from_array((0.1 * rng.standard_normal(hidden)).astype(np.float32), "beta")]
    def average(src, dst):
        if mean == "pool":
            return helper.make_node("GlobalAveragePool", [src], [dst])
        return helper.make_node("ReduceMean", [src], [dst], axes=[axis], keepdims=1)

    nodes = [average("x", "mean"), helper.make_node("Sub", ["x", "mean"] if diff == "x-mean" else ["mean", "x"], ["d"]),
             helper.make_node("Mul", ["d", "d"], ["sq"]), average("sq", "var"),
             helper.make_node("Add", ["var", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["std"]),
             helper.make_node("Reciprocal", ["std"], ["inv"]), helper.make_node("Mul", ["inv", "gamma"], ["s"]),
             helper.make_node("Mul", ["mean", "s"], ["ms"]), helper.make_node("Sub", ["beta", "ms"], ["shift"]),
             helper.make_node("Mul", ["x", "s"], ["xs"]), helper.make_node("Add", ["xs", "shift"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def _run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


CTX = FusionContext("bert_tf", 0, 8)


@pytest.mark.parametrize("mean,diff", [("pool", "x-mean"), ("reduce", "x-mean"), ("reduce", "mean-x")])
def test_tf_layer_norm_rank3_fuses_with_parity(mean, diff):
    proto = _tf_layer_norm_graph(["b", "s", 8], mean, diff=diff)
    model = ir.serde.deserialize_model(proto)
    assert run_fusion(layer_norm_tf.FUSION, model, CTX).fused == 1
    assert counts(model)[("", "LayerNormalization")] == 1 and counts(model)[("", "GlobalAveragePool")] == 0
    x = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(ir.serde.serialize_model(model), x), _run(proto, x), atol=1e-5, rtol=1e-4)


def test_global_average_pool_over_two_axes_does_not_fuse():
    """On a rank-4 input GlobalAveragePool averages the last two axes: not a LayerNorm over the last one."""
    model = ir.serde.deserialize_model(_tf_layer_norm_graph(["b", "s", 4, 8]))
    log = run_fusion(layer_norm_tf.FUSION, model, CTX, explain=True)
    assert log.fused == 0
    assert any("rank-4" in line for line in log.refused), log.refused


@pytest.mark.parametrize("diff", ["x-mean", "mean-x"])
def test_reduce_mean_over_another_axis_does_not_fuse(diff):
    model = ir.serde.deserialize_model(_tf_layer_norm_graph(["b", 8, 8], "reduce", axis=1, diff=diff))
    log = run_fusion(layer_norm_tf.FUSION, model, CTX, explain=True)
    assert log.fused == 0
    assert any("not the last axis" in line for line in log.refused), log.refused


def _tensordot_graph(target: list[int]) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s", 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [onnx.numpy_helper.from_array(np.array([-1, 8], dtype=np.int64), "flat"),
             onnx.numpy_helper.from_array(np.ones((8, 6), dtype=np.float32), "w"),
             onnx.numpy_helper.from_array(np.array(target, dtype=np.int64), "target")]
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "idx"], ["lead"], axis=0),
             helper.make_node("Concat", ["lead", "n"], ["back"], axis=0),
             helper.make_node("Reshape", ["x", "flat"], ["x2"]), helper.make_node("MatMul", ["x2", "w"], ["m"]),
             helper.make_node("Reshape", ["m", "back" if not target else "target"], ["y"])]
    inits += [onnx.numpy_helper.from_array(np.array([0, 1], dtype=np.int64), "idx"),
              onnx.numpy_helper.from_array(np.array([6], dtype=np.int64), "n")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_tensordot_unflatten_becomes_matmul():
    model = ir.serde.deserialize_model(_tensordot_graph([]))
    assert run_fusion(tensordot.FUSION, model, CTX).fused == 1
    out = model.graph.outputs[0].producer()
    assert out.op_type == "MatMul" and out.inputs[0] is model.graph.inputs[0]


def test_tensordot_that_does_not_restore_the_leading_dims_is_kept():
    """A flatten -> MatMul -> reshape to [-1, 3, 6]: not x's [batch, sequence] back, must stay as is."""
    model = ir.serde.deserialize_model(_tensordot_graph([-1, 3, 6]))
    log = run_fusion(tensordot.FUSION, model, CTX, explain=True)
    assert log.fused == 0
    assert any("does not restore" in line for line in log.refused), log.refused


def _keras_tensordot_graph(inner: list[int], heads: bool = False) -> onnx.ModelProto:
    """keras2onnx's Tensordot: the flatten target computed at run time,
    Cast(Concat(Unsqueeze(ReduceProd(Gather(Cast(Shape(x)), [0, 1]))), Unsqueeze(ReduceProd(Gather(.., inner)))));
    x is [b, s, 8], or [b, s, 2, 4] whose heads the flatten merges (``heads``)."""
    shape = ["b", "s", 2, 4] if heads else ["b", "s", 8]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((8, 6)).astype(np.float32), "w"),
             onnx.numpy_helper.from_array(np.array([0, 1], dtype=np.int64), "free"),
             onnx.numpy_helper.from_array(np.array(inner, dtype=np.int64), "inner"),
             onnx.numpy_helper.from_array(np.array([6], dtype=np.int32), "n")]
    nodes = [helper.make_node("Shape", ["x"], ["shape64"]), helper.make_node("Cast", ["shape64"], ["shape"], to=6),
             helper.make_node("Gather", ["shape", "free"], ["lead"], axis=0),
             helper.make_node("Gather", ["shape", "inner"], ["contracted"], axis=0),
             helper.make_node("ReduceProd", ["lead"], ["rows"], axes=[0], keepdims=0),
             helper.make_node("ReduceProd", ["contracted"], ["cols"], axes=[0], keepdims=0),
             helper.make_node("Unsqueeze", ["rows"], ["rows1"], axes=[0]),
             helper.make_node("Unsqueeze", ["cols"], ["cols1"], axes=[0]),
             helper.make_node("Concat", ["rows1", "cols1"], ["flat32"], axis=0),
             helper.make_node("Cast", ["flat32"], ["flat"], to=7),
             helper.make_node("Concat", ["lead", "n"], ["back32"], axis=0),
             helper.make_node("Cast", ["back32"], ["back"], to=7),
             helper.make_node("Reshape", ["x", "flat"], ["x2"]), helper.make_node("MatMul", ["x2", "w"], ["m"]),
             helper.make_node("Reshape", ["m", "back"], ["y"])]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", 11)], ir_version=6)


@pytest.mark.parametrize("heads", [False, True])
def test_keras_tensordot_with_run_time_flatten_becomes_matmul(heads):
    proto = _keras_tensordot_graph([2, 3] if heads else [2], heads=heads)   # [b, s, 2, 4]: axes 2, 3 contracted
    model = ir.serde.deserialize_model(proto)
    assert run_fusion(tensordot.FUSION, model, CTX).fused == 1
    assert counts(model)[("", "MatMul")] == 1
    x = np.random.default_rng(1).standard_normal((2, 5, 2, 4) if heads else (2, 5, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(ir.serde.serialize_model(model), x), _run(proto, x), atol=1e-5, rtol=1e-4)


def test_keras_tensordot_contracting_another_axis_is_kept():
    """The run-time flatten reads the sequence axis as the contracted one ([b * 8, s]): refused, unknown."""
    model = ir.serde.deserialize_model(_keras_tensordot_graph([1]))
    log = run_fusion(tensordot.FUSION, model, CTX, explain=True)
    assert log.fused == 0
    assert any("the flattening reshape is" in line for line in log.refused), log.refused
