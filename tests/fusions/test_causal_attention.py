"""GPT-2 causal self-attention -> MultiHeadAttention (unidirectional), with and without past state.

Positive: GPT2LMHeadModel on every layout {torchscript 14, dynamo 18} x {eager, sdpa} x {past, no past},
GPT2Model and a DistilGPT2-shaped 6-layer LM on opposite corners; the whole pipeline runs, so FastGelu
(bias absorbed) and SkipLayerNormalization (2 per layer + the final one) are counted too. Parity is
generation parity: batch 3 with no, right and LEFT padding, past lengths 0, 1, 4, 17 and sequence 1 and 5,
logits (or last_hidden_state) and every present compared.
Negative: near-misses made by editing real exports (a bidirectional padding mask instead of the causal
one, a causal mask whose diagonal is shifted, Softmax over the query axis) must not fuse, with the reason.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from conftest import GPT2_VARIANTS

from mlstep.optimizer import OptimizeOptions, optimize
from mlstep.optimizer.fusions._base import MS_DOMAIN
from mlstep.optimizer.passes import prepare
from mlstep.validate import check_parity, synthesize_inputs
from graph_edits import const_node as _const, softmax_adds as _softmax_adds

HEADS = 4
PASTS = (0, 1, 4, 17)
SEQUENCES = (1, 5)

# Every layout for GPT2LMHeadModel; GPT2Model and DistilGPT2 on two opposite corners, with and without past.
FULL = [("lm", e, o, a, p) for e, o in (("torchscript", 14), ("dynamo", 18)) for a in ("eager", "sdpa")
        for p in (False, True)]
# -m slow: cells whose layout an always-run cell of the same model covers (FULL has every layout; GPT2Model
# and DistilGPT2 keep dynamo 18 sdpa with past, GPT2Model TorchScript 14 eager with past).
_SLOW = {("distil", "torchscript", 14, "eager", True), ("model", "dynamo", 18, "sdpa", False),
         ("distil", "dynamo", 18, "sdpa", False)}
CORNERS = [pytest.param(*c, marks=pytest.mark.slow) if c in _SLOW else c
           for c in [(v, "torchscript", 14, "eager", True) for v in ("model", "distil")]
           + [(v, "dynamo", 18, "sdpa", p) for v in ("model", "distil") for p in (False, True)]]


def ops(model: ir.Model) -> Counter:
    return Counter((n.domain, n.op_type) for n in model.graph)


def nodes(model: ir.Model, op_type: str) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == op_type and n.domain == MS_DOMAIN]


def generation_cases(original: ir.Model, with_past: bool):
    """Batch 3 (no / right / left padding) at every past length and sequence length (no past: past 0)."""
    cases = []
    for past in PASTS if with_past else (0,):
        for seq in SEQUENCES + (() if with_past else (8,)):
            for case in synthesize_inputs(original, batch=3, sequence=seq, past_sequence=past):
                case.name = f"{case.name} past={past} seq={seq}"
                cases.append(case)
    return cases


def assert_generation_parity(path: Path, fused: ir.Model, tmp_path: Path, with_past: bool) -> None:
    saved = tmp_path / "fused.onnx"
    ir.save(fused, saved)
    original = ir.load(path)
    cases = generation_cases(original, with_past)
    assert any("left" in c.name and c.feeds["attention_mask"][:, 0].min() == 0 for c in cases)  # real left pads
    result = check_parity(path, saved, "fp32", cases)
    outputs = {v.name for v in original.graph.outputs}
    assert set(result.per_output) == outputs                        # logits AND every present compared
    assert result.passed, (result.worst_output, result.worst_case, result.max_abs_diff)


def fuse(path: Path, verbose: bool = False):
    return optimize(ir.load(path), OptimizeOptions(verbose=verbose))


@pytest.mark.parametrize("variant,exporter,opset,attention,with_past", FULL + CORNERS)
def test_gpt2_fully_fused_with_generation_parity(exported_gpt2, tmp_path, variant, exporter, opset, attention,
                                                 with_past):
    n_layer, lm_head = GPT2_VARIANTS[variant]
    path = exported_gpt2(variant, exporter, opset, attention, with_past)
    result = fuse(path)
    model = result.model
    counts = ops(model)
    assert result.model_type == "gpt2"
    # attention: one MHA per layer, causal, every head; no Softmax left anywhere
    mha = nodes(model, "MultiHeadAttention")
    assert len(mha) == n_layer, result.summary_lines()
    assert counts[("", "Softmax")] == 0
    for node in mha:
        assert node.attributes.get_int("unidirectional") == 1
        assert node.attributes.get_int("num_heads") == HEADS
    # past: the MHA nodes read the past inputs and produce the present outputs themselves
    presents = [v for v in model.graph.outputs if v.name.startswith("present_")]
    assert len(presents) == (2 * n_layer if with_past else 0)
    for value in presents:
        producer = value.producer()
        assert producer.op_type == "MultiHeadAttention" and producer.domain == MS_DOMAIN, value.name
        layer = int(value.name.rsplit("_", 1)[1])
        kind = value.name.split("_")[1]
        assert producer.inputs[6 if kind == "key" else 7].name == f"past_{kind}_{layer}"
    if not with_past:
        assert all(len(n.outputs) == 1 for n in mha)
    # MLP: FastGelu with the bias absorbed, one per layer
    gelus = nodes(model, "FastGelu")
    assert len(gelus) == n_layer
    assert all(len(n.inputs) == 2 and n.inputs[1] is not None and n.inputs[1].const_value is not None
               for n in gelus)
    assert counts[("", "Tanh")] == 0
    # residuals: 2 SkipLayerNormalization per layer, plus the final LayerNorm (it takes the last sum); the first
    # block's LayerNorm of the embedding sum may be taken by EmbedLayerNormalization instead (issue 10)
    eln = len(nodes(model, "EmbedLayerNormalization"))
    assert eln <= 1 and len(nodes(model, "SkipLayerNormalization")) + eln == 2 * n_layer + 1
    assert [v.name for v in model.graph.outputs][0] == ("logits" if lm_head else "last_hidden_state")
    assert_generation_parity(path, model, tmp_path, with_past)


# --- negative: near-misses made from real exports --------------------------------------------------



def _prepend(model: ir.Model, new_nodes: list[ir.Node], prefix: str) -> None:
    for i, node in enumerate(new_nodes):
        node.outputs[0].name = f"{prefix}_{i}"
    model.graph.insert_before(next(iter(model.graph)), new_nodes)


def _input(model: ir.Model, name: str) -> ir.Value:
    return next(v for v in model.graph.inputs if v.name == name)


def bidirectional_padding_mask(model: ir.Model) -> None:
    """The causal + padding bias becomes a pure padding bias (1 - mask[:, None, None, :]) * -1e9: every
    query sees every non-padded key, future ones included (an encoder's mask)."""
    mask = _input(model, "attention_mask")
    cast = ir.node("Cast", [mask], attributes={"to": ir.DataType.FLOAT})
    one, big, axes = _const(np.array(1.0, np.float32)), _const(np.array(-1e9, np.float32)), \
        _const(np.array([1, 2], np.int64))
    inverted = ir.node("Sub", [one.outputs[0], cast.outputs[0]])
    bias = ir.node("Mul", [inverted.outputs[0], big.outputs[0]])
    expanded = ir.node("Unsqueeze", [bias.outputs[0], axes.outputs[0]])
    _prepend(model, [cast, one, big, axes, inverted, bias, expanded], "padding_bias")
    for add, index in _softmax_adds(model):
        add.replace_input_with(index, expanded.outputs[0])


def _add_triangle(model: ir.Model, prefix: str, upper: bool, below_past: int) -> None:
    """Add Trilu(-1e9, k=past-below_past, upper) over [S, past + S] to every softmax's additive bias."""
    ids, mask = _input(model, "input_ids"), _input(model, "attention_mask")
    one = _const(np.array(1, np.int64))
    zero_axis = _const(np.array([0], np.int64))
    offset = _const(np.array(below_past, np.int64))
    ids_shape, mask_shape = ir.node("Shape", [ids]), ir.node("Shape", [mask])
    seq = ir.node("Gather", [ids_shape.outputs[0], one.outputs[0]], attributes={"axis": 0})
    total = ir.node("Gather", [mask_shape.outputs[0], one.outputs[0]], attributes={"axis": 0})
    past = ir.node("Sub", [total.outputs[0], seq.outputs[0]])
    k = ir.node("Sub", [past.outputs[0], offset.outputs[0]])
    seq1 = ir.node("Unsqueeze", [seq.outputs[0], zero_axis.outputs[0]])
    total1 = ir.node("Unsqueeze", [total.outputs[0], zero_axis.outputs[0]])
    square = ir.node("Concat", [seq1.outputs[0], total1.outputs[0]], attributes={"axis": 0})
    fill = ir.node("ConstantOfShape", [square.outputs[0]],
                   attributes={"value": ir.tensor(np.array([-1e9], dtype=np.float32))})
    triangle = ir.node("Trilu", [fill.outputs[0], k.outputs[0]], attributes={"upper": int(upper)})
    _prepend(model, [one, zero_axis, offset, ids_shape, mask_shape, seq, total, past, k, seq1, total1, square, fill,
                     triangle], prefix)
    for n, (add, index) in enumerate(_softmax_adds(model)):
        biased = ir.node("Add", [add.inputs[index], triangle.outputs[0]])
        biased.outputs[0].name = f"{prefix}_bias_{n}"
        model.graph.insert_before(add, biased)
        add.replace_input_with(index, biased.outputs[0])


def shifted_diagonal(model: ir.Model) -> None:
    """The causal bias + triu(-1e9, k=past) over [S, past + S]: query i no longer sees key past + i (itself)."""
    _add_triangle(model, "shifted", upper=True, below_past=0)


def softmax_over_queries(model: ir.Model) -> None:
    for node in model.graph:
        if node.op_type == "Softmax":
            node.attributes["axis"] = ir.Attr("axis", ir.AttributeType.INT, 2)


def _session(path: Path) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


NEAR_MISS_LAYOUTS = [("torchscript", 14, "eager", True), ("dynamo", 18, "sdpa", True), ("dynamo", 18, "eager", False)]


@pytest.mark.parametrize("exporter,opset,attention,with_past", NEAR_MISS_LAYOUTS)
@pytest.mark.parametrize("edit,says", [(bidirectional_padding_mask, "does not block future"),
                                       (shifted_diagonal, "not zero on visible tokens"),
                                       (softmax_over_queries, "not over the key axis")])
def test_near_miss_does_not_fuse(exported_gpt2, tmp_path, exporter, opset, attention, with_past, edit, says):
    path = exported_gpt2("lm", exporter, opset, attention, with_past)
    model = prepare(ir.load(path))
    edit(model)
    edited = tmp_path / "edited.onnx"
    ir.save(model, edited)
    # the edit is a valid model that computes something else (left-padded generation step): fusing it
    # as causal attention would be wrong
    feeds = synthesize_inputs(ir.load(path), batch=3, sequence=5, past_sequence=4 if with_past else 0)[2].feeds
    assert not np.allclose(_session(edited).run(None, feeds)[0], _session(path).run(None, feeds)[0], atol=1e-3)
    result = fuse(edited, verbose=True)
    counts = ops(result.model)
    assert counts[(MS_DOMAIN, "MultiHeadAttention")] == 0
    assert counts[(MS_DOMAIN, "Attention")] == 0
    assert counts[("", "Softmax")] == 2
    refused = [r for entry in result.log if entry.name == "causal_attention" for r in entry.refused]
    assert any(says in reason for reason in refused), result.summary_lines()
    # what did fuse around the refused attention still computes the edited model's function
    saved = tmp_path / "fused.onnx"
    ir.save(result.model, saved)
    parity = check_parity(edited, saved, "fp32", synthesize_inputs(ir.load(edited), batch=3, sequence=5,
                                                                   past_sequence=4 if with_past else 0))
    assert parity.passed, (parity.worst_output, parity.worst_case, parity.max_abs_diff)


# --- layouts from the wild: the runtime scale (transformers 4.x), a sliding window that short probes miss -----

from wild_exports import export_gpt2_runtime_scale  # noqa: E402


@pytest.mark.parametrize("with_past", [False, True])
def test_runtime_scale_gpt2_fully_fused_with_generation_parity(export_dir, tmp_path, with_past):
    path = export_gpt2_runtime_scale(with_past, export_dir / f"gpt2-rtscale{'-past' if with_past else ''}.onnx")
    result = fuse(path)
    counts = ops(result.model)
    assert len(nodes(result.model, "MultiHeadAttention")) == 2, result.summary_lines()
    assert counts[("", "Softmax")] == 0 and counts[("", "Sqrt")] == 0     # the scale chains are gone too
    # the embedding (a no-op float Cast after its position Gather) is EmbedLayerNormalization, the rest SkipLN
    assert len(nodes(result.model, "SkipLayerNormalization")) == 4
    assert len(nodes(result.model, "EmbedLayerNormalization")) == 1
    assert_generation_parity(path, result.model, tmp_path, with_past)


def _in_vocab(cases, vocab: int = 99):
    """Token ids within the tiny vocabulary (the synthesized ids can reach it on long sequences)."""
    for case in cases:
        case.feeds["input_ids"] = case.feeds["input_ids"] % vocab
    return cases


def sliding_window(model: ir.Model, window: int = 10) -> None:
    """The causal bias + tril(-1e9, k=past-window) over [S, past + S]: query i (at position past + i) sees
    only the last ``window`` keys, past + i - window + 1 .. past + i (a sliding-window causal mask)."""
    _add_triangle(model, "window", upper=False, below_past=window)


@pytest.mark.parametrize("exporter,opset,with_past", [("torchscript", 14, True), ("dynamo", 18, False)])
def test_sliding_window_is_not_fused_as_causal(exported_gpt2, tmp_path, exporter, opset, with_past):
    """Window 10: the same function as plain causal attention below 10 tokens, a different one beyond. Probes
    at short lengths only would accept it; the long probe (>= 64 tokens) must refuse it."""
    path = exported_gpt2("lm", exporter, opset, "sdpa", with_past)
    model = prepare(ir.load(path))
    sliding_window(model)
    edited = tmp_path / "window.onnx"
    ir.save(model, edited)
    plain, banded = _session(path), _session(edited)
    short = synthesize_inputs(ir.load(path), batch=3, sequence=5, past_sequence=3 if with_past else 0)[2].feeds
    long = _in_vocab(synthesize_inputs(ir.load(path), batch=3, sequence=5 if with_past else 30,
                                       past_sequence=17 if with_past else 0))[2].feeds
    assert np.allclose(banded.run(None, short)[0], plain.run(None, short)[0], atol=1e-5)
    assert not np.allclose(banded.run(None, long)[0], plain.run(None, long)[0], atol=1e-3)
    result = fuse(edited, verbose=True)
    assert ops(result.model)[(MS_DOMAIN, "MultiHeadAttention")] == 0
    attention = result.coverage["attention"]
    assert (attention.fused, attention.detected) == (0, 2)
    assert all("not zero on visible tokens" in miss for miss in attention.misses), attention.misses
    saved = tmp_path / "fused.onnx"
    ir.save(result.model, saved)
    cases = _in_vocab(synthesize_inputs(ir.load(edited), batch=3, sequence=5 if with_past else 30,
                                        past_sequence=17 if with_past else 0))
    parity = check_parity(edited, saved, "fp32", cases)
    assert parity.passed, (parity.worst_output, parity.worst_case, parity.max_abs_diff)


# --- the CUDA form: the export's own bias as attention_bias ------------------------------------------

@pytest.mark.parametrize("exporter,opset,attention,with_past", [("torchscript", 14, "eager", True),
                                                                 ("dynamo", 18, "sdpa", True),
                                                                 ("torchscript", 14, "sdpa", False)])
def test_cuda_target_passes_the_exports_bias_with_generation_parity(exported_gpt2, tmp_path, exporter, opset,
                                                                    attention, with_past):
    """With use_gpu the fused node takes the export's additive mask as attention_bias (no key_padding_mask, no
    unidirectional): ONNX Runtime's CUDA kernels given the padding mask differ on left-padded rows that see no
    key (measured on an H200), given the bias they do not. Parity here runs the same graph on the CPU."""
    path = exported_gpt2("lm", exporter, opset, attention, with_past)
    result = optimize(ir.load(path), OptimizeOptions(use_gpu=True))
    mha = nodes(result.model, "MultiHeadAttention")
    assert len(mha) == GPT2_VARIANTS["lm"][0], result.summary_lines()
    for node in mha:
        assert node.attributes.get_int("unidirectional", 0) == 0
        assert node.inputs[4] is None and node.inputs[5] is not None      # no key_padding_mask; the bias
        assert "mask_filter_value" not in node.attributes
        if with_past:
            assert node.inputs[6].name.startswith("past_key_") and node.inputs[7].name.startswith("past_value_")
    assert_generation_parity(path, result.model, tmp_path, with_past)
    fp16 = tmp_path / "fp16.onnx"
    from mlstep.precision import to_fp16
    ir.save(to_fp16(result.model, keep_io_types=True), fp16)
    original = ir.load(path)
    verdict = check_parity(path, fp16, "fp16", generation_cases(original, with_past))
    assert verdict.passed, (verdict.worst_output, verdict.worst_case, verdict.max_abs_diff)
