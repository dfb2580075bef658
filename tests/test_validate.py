"""Input synthesis from graph signatures and ORT parity, on real exports and handmade graphs."""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper

from mlstep.export import ExportSpec
from mlstep.validate import Case, check_parity, providers, run_reference, synthesize_inputs
from mlstep.validate.parity import CPU, CUDA

try:
    from tests.test_precision import ms_model
except ImportError:  # run with tests/ (not the repository root) on sys.path
    from test_precision import ms_model

BERT = ExportSpec("bert", "dynamo", 18, "sdpa")


def _save(nodes, inputs, outputs, path, inits=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                      helper.make_opsetid("com.microsoft", 1)], ir_version=9),
              str(path))
    return path


def _perturbed(src, dst, name_part="MatMul", scale=1.5, value=None):
    """A copy of ``src`` with the first weight read by a ``name_part`` node scaled (or set to ``value``)."""
    model = ir.load(src)
    node = next(n for n in model.graph if n.op_type == name_part and any(i.is_initializer() for i in n.inputs))
    weight = next(i for i in node.inputs if i.is_initializer())
    data = weight.const_value.numpy().copy()
    data = data * scale if value is None else np.full_like(data, value)
    weight.const_value = ir.tensor(data, name=weight.name)
    ir.save(model, dst)
    return dst


def test_bert_cases(exported):
    model = ir.load(exported(BERT))
    cases = synthesize_inputs(model, batch=3, sequence=8)
    assert [c.name for c in cases] == ["no-padding", "right-padded", "left-padded"]
    vocab = model.graph.initializers["inner.embeddings.word_embeddings.weight"].shape[0]
    by_name = {c.name: c.feeds for c in cases}
    for feeds in by_name.values():
        assert set(feeds) == {"input_ids", "attention_mask", "token_type_ids"}
        assert all(v.shape == (3, 8) and v.dtype == np.int64 for v in feeds.values())
        assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < vocab
        assert set(np.unique(feeds["token_type_ids"])) <= {0, 1}
        assert (feeds["attention_mask"].sum(axis=1) >= 1).all()
    right, left = by_name["right-padded"]["attention_mask"], by_name["left-padded"]["attention_mask"]
    assert (by_name["no-padding"]["attention_mask"] == 1).all()
    assert not np.array_equal(right, left)
    assert right[0].all() and left[0].all()  # row 0 full length
    assert right[1, 0] == 1 and right[1, -1] == 0 and left[1, 0] == 0 and left[1, -1] == 1
    lengths = right.sum(axis=1)
    assert len(set(lengths.tolist())) == 3 and (lengths == left.sum(axis=1)).all()


def test_int32_inputs_and_vocab_from_embed_layer_norm(tmp_path):
    model = ir.load(ms_model(tmp_path / "ms.onnx", vocab=7))
    for case in synthesize_inputs(model, seed=3):
        assert all(v.dtype == np.int32 for v in case.feeds.values())
        assert case.feeds["input_ids"].max() < 7 and case.feeds["segment_ids"].max() <= 1
        assert case.feeds["input_ids"].shape == (2, 8)


def test_position_ids_of_embed_layer_norm_bound_the_ids_it_shares(tmp_path):
    """One ``ids`` input read as input, segment and position ids of an EmbedLayerNormalization (ORT's GPT-2 test
    graphs after fusion): the position table (input 3, 10 rows here) bounds it too."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    tables = {name: numpy_helper.from_array(rng.standard_normal((rows, 8)).astype(np.float32), name)
              for name, rows in (("word", 101), ("pos", 10), ("seg", 100))}
    norm = [numpy_helper.from_array(np.ones(8, np.float32), "g"), numpy_helper.from_array(np.zeros(8, np.float32), "b")]
    node = helper.make_node("EmbedLayerNormalization", ["ids", "ids", "word", "pos", "seg", "g", "b", "", "ids"],
                            ["out", "mask_index"], domain="com.microsoft")
    graph = helper.make_graph([node], "eln", [helper.make_tensor_value_info("ids", TensorProto.INT32, ["b", "s"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
                              [*tables.values(), *norm])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                                 helper.make_opsetid("com.microsoft", 1)]))
    for case in synthesize_inputs(model, sequence=8):
        assert case.feeds["ids"].max() < 10


def test_embed_layer_norm_without_position_ids_bounds_the_sequence():
    """Without position ids an EmbedLayerNormalization reads rows 0..S-1 of its position table (5 rows here):
    the synthesized sequence never exceeds it (a fused ELN table of 2 rows made every case fail in ORT)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("word", (30, 8)), ("pos", (5, 8)), ("g", (8,)), ("b", (8,)))]
    node = helper.make_node("EmbedLayerNormalization", ["ids", "", "word", "pos", "", "g", "b"],
                            ["out", "mask_index"], domain="com.microsoft")
    graph = helper.make_graph([node], "eln", [helper.make_tensor_value_info("ids", TensorProto.INT32, ["b", "s"])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                                 helper.make_opsetid("com.microsoft", 1)]))
    for case in synthesize_inputs(model, sequence=8):
        assert case.feeds["ids"].shape == (2, 5) and case.feeds["ids"].max() < 30


def test_mask_dtypes_positions_past_and_static_dims(tmp_path):
    f, i32, b = TensorProto.FLOAT, TensorProto.INT32, TensorProto.BOOL
    inputs = [helper.make_tensor_value_info("input_ids", i32, ["batch", "sequence"]),
              helper.make_tensor_value_info("attention_mask", f, ["batch", "total"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "sequence"]),
              helper.make_tensor_value_info("past_key_values.0.key", f, ["batch", 2, "past_sequence", 4])]
    path = _save([helper.make_node("Identity", ["attention_mask"], ["y"])], inputs,
                 [helper.make_tensor_value_info("y", f, None)], tmp_path / "past.onnx")
    cases = {c.name: c.feeds for c in synthesize_inputs(ir.load(path), batch=2, sequence=3, past_sequence=5)}
    feeds = cases["left-padded"]
    assert feeds["input_ids"].dtype == np.int32 and feeds["input_ids"].shape == (2, 3)
    assert feeds["attention_mask"].dtype == np.float32 and feeds["attention_mask"].shape == (2, 8)
    assert feeds["past_key_values.0.key"].shape == (2, 2, 5, 4)
    assert feeds["attention_mask"][1].tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    assert feeds["position_ids"][0].tolist() == [5, 6, 7]
    assert feeds["position_ids"][1].tolist() == [1, 2, 3]  # counted from the first real token
    assert cases["right-padded"]["position_ids"][1].tolist() == [5, 6, 7]

    static = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [3, 5]),
              helper.make_tensor_value_info("input_mask", b, [3, 5])]
    path = _save([helper.make_node("Identity", ["input_mask"], ["y"])], static,
                 [helper.make_tensor_value_info("y", b, None)], tmp_path / "static.onnx")
    for case in synthesize_inputs(ir.load(path)):
        assert case.feeds["input_ids"].shape == (3, 5) and case.feeds["input_mask"].dtype == np.bool_
        assert case.feeds["input_mask"].any(axis=1).all()


def test_parity_identical_passes_and_reference_reused(exported):
    src = exported(BERT)
    cases = synthesize_inputs(ir.load(src))
    ref = run_reference(src, cases)
    assert len(ref) == 3 and ref[0]["last_hidden_state"].shape == (2, 8, 32)
    result = check_parity(src, src, "fp32", cases, reference_outputs=ref)
    assert result.passed and result.max_abs_diff < 1e-4 and result.provider == CPU
    assert set(result.per_output) == {"last_hidden_state"}


def test_parity_fails_on_perturbed_weight_and_names_output(tmp_path):
    src = ms_model(tmp_path / "ms.onnx")
    bad = _perturbed(src, tmp_path / "bad.onnx", "BiasGelu", scale=1.2)  # only last_hidden_state depends on it
    cases = synthesize_inputs(ir.load(src))
    for precision in ("fp32", "fp16"):
        result = check_parity(src, bad, precision, cases)
        assert not result.passed
        assert result.worst_output == "last_hidden_state" and result.worst_case in {c.name for c in cases}
        assert result.per_output["ffn_hidden"] < 1e-5 < result.per_output["last_hidden_state"]
        assert result.max_abs_diff == result.per_output["last_hidden_state"]


def test_parity_fails_on_small_fp32_drift_that_fp16_tolerates(exported, tmp_path):
    src = exported(BERT)
    bad = _perturbed(src, tmp_path / "drift.onnx", "MatMul", scale=1.03)  # a query projection: ~3e-4 at the output
    cases = synthesize_inputs(ir.load(src))
    ref = run_reference(src, cases)
    assert not check_parity(src, bad, "fp32", cases, reference_outputs=ref).passed
    assert check_parity(src, bad, "fp16", cases, reference_outputs=ref).passed


def test_parity_nan_fails(tmp_path):
    src = ms_model(tmp_path / "ms.onnx")
    bad = _perturbed(src, tmp_path / "nan.onnx", "FastGelu", value=np.nan)
    result = check_parity(src, bad, "fp16", synthesize_inputs(ir.load(src)))
    assert not result.passed and math.isinf(result.max_abs_diff)
    assert result.worst_output in {"ffn_hidden", "last_hidden_state"}


def test_providers_only_lists_cuda_when_it_loads():
    assert providers(False) == [CPU]
    got = providers(True)
    assert got[-1] == CPU and got in ([CPU], [CUDA, CPU])
    assert providers(True) == got  # cached


def test_case_is_a_plain_dataclass():
    case = Case("x", {"a": np.zeros(1)})
    assert case.name == "x" and set(case.feeds) == {"a"}


# ----------------------------------------------------------------- parity that short sequences can't fool

def test_parity_cases_cover_the_users_shape_a_long_one_and_past(exported, exported_gpt2):
    from mlstep.validate.parity import LONG_SEQUENCE, parity_cases

    bert = parity_cases(ir.load(exported(BERT)), batch=2, sequence=8)
    assert [c.name for c in bert] == [f"s{n}/{p}" for n in (8, LONG_SEQUENCE)
                                      for p in ("no-padding", "right-padded", "left-padded")]
    assert bert[-1].feeds["input_ids"].shape == (2, 64) and LONG_SEQUENCE >= 64
    assert [c.name for c in parity_cases(ir.load(exported(BERT)), sequence=80)][:1] == ["s80/no-padding"]
    assert len(parity_cases(ir.load(exported(BERT)), sequence=80)) == 3          # already long

    gpt2 = parity_cases(ir.load(exported_gpt2("lm", "torchscript", 14, "sdpa", True)), batch=2, sequence=8)
    names = [c.name for c in gpt2]
    for past in (1, 17):
        for new in (1, 8):
            assert f"past{past}+{new}/left-padded" in names
            case = next(c for c in gpt2 if c.name == f"past{past}+{new}/left-padded")
            assert case.feeds["input_ids"].shape == (2, new)
            assert case.feeds["attention_mask"].shape == (2, past + new)
            assert case.feeds["attention_mask"][1, 0] == 0 and case.feeds["attention_mask"][1, -1] == 1
            key = next(k for k in case.feeds if k.startswith("past"))
            assert case.feeds[key].shape[-2] == past


def test_a_model_wrong_only_beyond_short_positions_fails_parity(exported, tmp_path):
    """Near miss for the short-probe defect: position rows >= 8 perturbed. The user's shape (8) alone passes;
    the long case catches it."""
    from mlstep.validate.parity import parity_cases

    src = exported(BERT)
    model = ir.load(src)
    table = next(v for name, v in model.graph.initializers.items() if "position_embeddings" in name)
    data = table.const_value.numpy().copy()
    data[8:] *= -1.0                       # (a constant shift would vanish in the LayerNorm)
    table.const_value = ir.tensor(data, name=table.name)
    ir.save(model, tmp_path / "late.onnx")
    cases = parity_cases(ir.load(src), batch=2, sequence=8)
    short = [c for c in cases if c.name.startswith("s8/")]
    assert check_parity(src, tmp_path / "late.onnx", "fp32", short).passed
    result = check_parity(src, tmp_path / "late.onnx", "fp32", cases)
    assert not result.passed and result.worst_case.startswith("s64/")
