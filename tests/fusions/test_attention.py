"""Encoder self-attention -> com.microsoft Attention (raw 2-D mask): every layout, parity under right, left
and holed padding at batch 3, and near-misses made by editing real exports (causal mask, Softmax over a
non-key axis, K split into other heads than Q) that must not fuse."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import ATTENTIONS, LAYOUTS
from test_gelu import CTX, ops

from mlstep.export import ExportSpec
from mlstep.optimizer.fusions._base import MS_DOMAIN, run_fusion
from mlstep.optimizer.fusions.attention import FUSION
from mlstep.optimizer.passes import prepare
from graph_edits import const_node as _const, softmax_adds as _softmax_adds

# Rows of different lengths in every padded case; the holed rows have gaps inside the sequence.
MASKS = {
    "right": [[1] * 8, [1] * 5 + [0] * 3, [1] * 2 + [0] * 6],
    "left": [[1] * 8, [0] * 3 + [1] * 5, [0] * 6 + [1] * 2],
    "holed": [[1, 0, 1, 1, 0, 1, 1, 1], [1, 1, 1, 0, 0, 1, 1, 0], [0, 1, 0, 1, 0, 1, 0, 1]],
}
# The other families on two opposite corners of the matrix; BERT on all of it.
SUBSET = [("torchscript", 14, "eager"), ("dynamo", 18, "sdpa")]
MATRIX = ([("bert", e, o, a) for e, o in LAYOUTS for a in ATTENTIONS]
          + [(f, e, o, a) for f in ("distilbert", "roberta", "albert") for e, o, a in SUBSET])


def feeds_for(names, mask, seed: int = 0) -> dict[str, np.ndarray]:
    """Batch 3, sequence 8; padded positions hold token 1 (RoBERTa's padding id), token types mixed."""
    rng = np.random.default_rng(seed)
    mask = np.array(mask, dtype=np.int64)
    ids = np.where(mask == 1, rng.integers(3, 50, mask.shape), 1)
    feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": rng.integers(0, 2, mask.shape)}
    return {k: v.astype(np.int64) for k, v in feeds.items() if k in names}


def session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def assert_parity(original: Path, fused: ir.Model, tmp_path: Path, masks=MASKS) -> None:
    """ORT (no graph optimizations) on the original vs the fused model: |a-b| <= 1e-4 + 1e-3*|ref|."""
    path = tmp_path / "fused.onnx"
    ir.save(fused, path)
    ref, got = session(original), session(path)
    names = [i.name for i in ref.get_inputs()]
    for kind, mask in masks.items():
        feed = feeds_for(names, mask)
        expected = ref.run(None, feed)[0]
        np.testing.assert_allclose(got.run(None, feed)[0], expected, atol=1e-4, rtol=1e-3, err_msg=kind)


def attention_nodes(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "Attention" and n.domain == MS_DOMAIN]


def graph_input_behind(value: ir.Value, model: ir.Model) -> str | None:
    """Name of the graph input a value is (through Casts), else None."""
    while value is not None and value not in model.graph.inputs:
        node = value.producer()
        if node is None or node.op_type != "Cast":
            return None
        value = node.inputs[0]
    return None if value is None else value.name


# --- positive: every layout -----------------------------------------------------------------------

@pytest.mark.parametrize("family,exporter,opset,attention", MATRIX)
def test_attention_fuses_with_raw_mask_and_parity(exported, tmp_path, family, exporter, opset, attention):
    path = exported(ExportSpec(family, exporter, opset, attention))
    model = prepare(ir.load(path))
    assert ops(model)[("", "Softmax")] == 2                      # the export really has two attentions
    log = run_fusion(FUSION, model, CTX, explain=True)
    counts = ops(model)
    fused = attention_nodes(model)
    assert log.fused == 2, log.refused
    assert counts[(MS_DOMAIN, "Attention")] == 2
    assert counts[("", "Softmax")] == 0
    for node in fused:
        assert node.attributes.get_int("num_heads") == 4
        # the raw 2-D mask, not a precomputed bias: any padding is the kernel's business
        assert len(node.inputs) == 4 and graph_input_behind(node.inputs[3], model) == "attention_mask"
        assert node.inputs[1].const_value is not None and node.inputs[1].shape == ir.Shape([32, 96])
    assert_parity(path, model, tmp_path)


@pytest.mark.parametrize("exporter,opset,attention", SUBSET)
def test_albert_layers_share_one_packed_qkv(exported, tmp_path, exporter, opset, attention):
    path = exported(ExportSpec("albert", exporter, opset, attention))
    model = prepare(ir.load(path))
    run_fusion(FUSION, model, CTX)
    first, second = attention_nodes(model)
    assert first.inputs[1] is second.inputs[1]                   # one packed weight for both layers
    assert first.inputs[2] is second.inputs[2]                   # and one packed bias
    packed = [name for name in model.graph.initializers if name.endswith("qkv_weight")]
    assert len(packed) == 1, packed
    saved = tmp_path / "albert_fused.onnx"
    ir.save(model, saved)
    stored = ir.load(saved)
    assert sum(name.endswith("qkv_weight") for name in stored.graph.initializers) == 1
    assert_parity(path, model, tmp_path)


# --- negative: near-misses made from real exports --------------------------------------------------



def make_causal(model: ir.Model) -> None:
    """Each mask bias + triu(-1e9, k=1) over [S, S], S read from the mask input: a causal padding mask."""
    mask = next(v for v in model.graph.inputs if v.name == "attention_mask")
    shape = ir.node("Shape", [mask])
    index = _const(np.array([1], dtype=np.int64))
    seq = ir.node("Gather", [shape.outputs[0], index.outputs[0]], attributes={"axis": 0})
    square = ir.node("Concat", [seq.outputs[0], seq.outputs[0]], attributes={"axis": 0})
    fill = ir.node("ConstantOfShape", [square.outputs[0]],
                   attributes={"value": ir.tensor(np.array([-1e9], dtype=np.float32))})
    k = _const(np.array(1, dtype=np.int64))
    upper = ir.node("Trilu", [fill.outputs[0], k.outputs[0]], attributes={"upper": 1})
    causal_nodes = [shape, index, seq, square, fill, k, upper]
    for i, node in enumerate(causal_nodes):
        node.outputs[0].name = f"causal_{i}"
    model.graph.insert_before(next(iter(model.graph)), causal_nodes)
    for n, (add, index) in enumerate(_softmax_adds(model)):
        causal = ir.node("Add", [add.inputs[index], upper.outputs[0]])
        causal.outputs[0].name = f"causal_mask_bias_{n}"
        model.graph.insert_before(add, causal)
        add.replace_input_with(index, causal.outputs[0])


def softmax_over_queries(model: ir.Model) -> None:
    for node in model.graph:
        if node.op_type == "Softmax":
            node.attributes["axis"] = ir.Attr("axis", ir.AttributeType.INT, 2)


def split_keys_differently(model: ir.Model) -> None:
    """K's head-splitting Reshape becomes [B, S, 2, 16] while Q stays [B, S, 4, 8]."""
    for add, index in _softmax_adds(model):                       # Add(scores, mask)
        node = add.inputs[1 - index].producer()
        while node.op_type != "MatMul":                           # back through the scaling to Q K^T
            node = next(v.producer() for v in node.inputs if v is not None and v.producer() is not None
                        and v.const_value is None)
        node = node.inputs[1].producer()
        while not (node.op_type == "Reshape" and node.inputs[0].producer().op_type in ("Add", "MatMul")):
            node = node.inputs[0].producer()                      # Mul / Transpose / Reshape towards the split
        shape = _const(np.array([0, 0, 2, 16], dtype=np.int64))
        model.graph.insert_before(node, shape)
        node.replace_input_with(1, shape.outputs[0])


NEAR_MISS_LAYOUTS = [("torchscript", 14, "eager"), ("torchscript", 17, "sdpa"), ("dynamo", 18, "sdpa"),
                     ("dynamo", 18, "eager")]


@pytest.mark.parametrize("exporter,opset,attention", NEAR_MISS_LAYOUTS)
@pytest.mark.parametrize("edit,says,runs", [(make_causal, "mask", True),
                                             (softmax_over_queries, "axis", True),
                                             (split_keys_differently, "head size", False)])
def test_near_miss_does_not_fuse(exported, tmp_path, exporter, opset, attention, edit, says, runs):
    path = exported(ExportSpec("bert", exporter, opset, attention))
    model = prepare(ir.load(path))
    edit(model)
    edited = tmp_path / "edited.onnx"
    ir.save(model, edited)
    if runs:  # the edit is a valid model that computes something else: fusing it would be wrong
        names = [i.name for i in session(path).get_inputs()]
        feed = feeds_for(names, MASKS["right"])
        assert not np.allclose(session(edited).run(None, feed)[0], session(path).run(None, feed)[0], atol=1e-3)
    log = run_fusion(FUSION, model, CTX, explain=True)
    counts = ops(model)
    assert log.fused == 0
    assert counts[(MS_DOMAIN, "Attention")] == 0
    assert counts[("", "Softmax")] == 2
    assert any(says in reason for reason in log.refused), log.refused


@pytest.mark.parametrize("exporter,opset,attention", [("torchscript", 14, "eager"), ("torchscript", 17, "sdpa"),
                                                      ("dynamo", 18, "sdpa")])
def test_a_row_with_nothing_to_attend_to_matches_too(exported, tmp_path, exporter, opset, attention):
    """An all-padding row: the export's own fill value (finfo.min: uniform weights; -inf + sdpa's NaN guard:
    zeros) is reproduced by the fused op, not ORT's default -10000."""
    path = exported(ExportSpec("bert", exporter, opset, attention))
    model = ir.load(path)
    prepare(model)
    assert run_fusion(FUSION, model, CTX).fused == 2
    assert_parity(path, model, tmp_path, masks={"empty row": [[1] * 8, [0] * 8, [0] * 3 + [1] * 5]})


# --- the attention scale computed at run time (transformers 4.x / Optimum exports) -----------------

from wild_exports import export_encoder_runtime_scale  # noqa: E402

RUNTIME_SCALE = [("bert", 14), ("bert", 17), ("distilbert", 17), ("roberta", 17), ("albert", 14)]


@pytest.fixture(scope="session")
def exported_runtime_scale(export_dir):
    cache: dict[tuple, Path] = {}

    def get(family: str, opset: int) -> Path:
        if (family, opset) not in cache:
            cache[family, opset] = export_encoder_runtime_scale(family, opset,
                                                                export_dir / f"{family}-ts{opset}-rtscale.onnx")
        return cache[family, opset]

    return get


def scale_chains(model: ir.Model) -> int:
    """Mul(Q or K^T, Sqrt(...)) feeding a MatMul: the scale is computed, not a literal."""
    return sum(1 for n in model.graph if n.op_type == "MatMul" for v in n.inputs
               if v.producer() is not None and v.producer().op_type == "Mul"
               and v.producer().inputs[1].producer() is not None
               and v.producer().inputs[1].producer().op_type == "Sqrt")


@pytest.mark.parametrize("family,opset", RUNTIME_SCALE)
def test_runtime_scale_fuses_with_parity(exported_runtime_scale, tmp_path, family, opset):
    path = exported_runtime_scale(family, opset)
    model = prepare(ir.load(path))
    assert scale_chains(model) == 4                         # Q and K^T scaled at run time, 2 layers
    log = run_fusion(FUSION, model, CTX, explain=True)
    assert log.fused == 2, log.refused
    for node in attention_nodes(model):                      # 1/sqrt(8) is Attention's default scale
        assert "scale" not in node.attributes or node.attributes.get_float("scale") == pytest.approx(8 ** -0.5)
    assert_parity(path, model, tmp_path)


def scale_from_sequence_axis(model: ir.Model) -> None:
    """The runtime scale reads Shape(Q)[-2] (the sequence length) instead of [-1] (the head size): a valid
    model whose scale changes with the input, so no constant scale exists."""
    for node in model.graph:
        if node.op_type == "Slice" and node.outputs[0].uses() and \
                next(iter(node.outputs[0].uses()))[0].op_type == "Cast":
            start = _const(np.array([-2], dtype=np.int64))
            end = _const(np.array([-1], dtype=np.int64))
            model.graph.insert_before(node, [start, end])
            node.replace_input_with(1, start.outputs[0])
            node.replace_input_with(2, end.outputs[0])


def test_runtime_scale_from_the_sequence_axis_does_not_fuse(exported_runtime_scale, tmp_path):
    path = exported_runtime_scale("bert", 17)
    model = prepare(ir.load(path))
    scale_from_sequence_axis(model)
    edited = tmp_path / "edited.onnx"
    ir.save(model, edited)
    names = [i.name for i in session(path).get_inputs()]
    feed = feeds_for(names, [row[:6] for row in MASKS["left"]])   # sequence 6 != head size 8
    assert not np.allclose(session(edited).run(None, feed)[0], session(path).run(None, feed)[0], atol=1e-3)
    log = run_fusion(FUSION, model, CTX, explain=True)
    assert log.fused == 0
    assert any("scale" in reason for reason in log.refused), log.refused


from wild_exports import export_encoder_auto_dims  # noqa: E402


@pytest.mark.parametrize("family,heads,head_size", [("albert", 9, 16), ("roberta", 6, 12)])
def test_separate_batch_symbols_and_odd_heads_fuse(export_dir, tmp_path, family, heads, head_size):
    """dynamo with Dim.AUTO: input_ids and attention_mask carry different batch symbols, and the export reads
    Shape(K) to rebuild K^T; the value analysis shows the dims equal, so the shape read is rebased and the
    attention fuses (was: 'Matched nodes have other uses' and no reason given)."""
    path = export_encoder_auto_dims(family, export_dir / f"{family}-dynamo18-auto-{heads}x{head_size}.onnx",
                                    heads, head_size)
    model = ir.load(path)
    batch = [v.shape[0] for v in model.graph.inputs]
    assert len({d.value for d in batch}) == 2                     # two spellings of one batch
    prepare(model)
    log = run_fusion(FUSION, model, CTX, explain=True)
    assert log.fused == 2, log.refused
    assert all(n.attributes.get_int("num_heads") == heads for n in attention_nodes(model))
    assert_parity(path, model, tmp_path)
