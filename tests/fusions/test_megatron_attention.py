"""Megatron GPT-2 (PyTorch 1.9, opset 12; ONNX Runtime's test file ``gpt2_megatron.onnx``) -> fully fused.

Its attention reads a float mask table ``attention_mask [B, 1, 64, 64]`` sliced to the current queries and
all keys and masks as ``scores * keep - 10000 * (1 - keep)``; its LayerNorms write ``x - mean`` twice and
``.float()`` no-op Casts sit around them. Expected (ONNX Runtime's test): EmbedLayerNormalization 1,
Attention 1 (here MultiHeadAttention: ORT's Attention takes no bias together with a past), FastGelu 1,
SkipLayerNormalization 2.
Positive: every block fuses and the fused model matches the original in ONNX Runtime, fp32 and fp16, batch 2,
tables with no, right and LEFT padding (a left-padded query keeps no key: the export averages every value),
past 0 and > 0, short and long sequences; also with Q scaled up so that scores are large (a float16 bias of
-65504 no longer absorbs them: the rows that keep nothing must still be averages).
Negative: a fill that does not vanish after Softmax (-10 instead of -10000) and a keep that is not 0/1
(the table halved) must not fuse, and say why.
Inputs: the parity synthesizer feeds such a table as a user builds it (lower triangle times the keys' padding).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from mlstep.optimizer import OptimizeOptions, optimize
from mlstep.precision import to_fp16

PEER = Path(__file__).resolve().parents[3] / "shared" / "peer-suite" / "models" / "current" / "gpt2_megatron.onnx"
pytestmark = pytest.mark.skipif(not PEER.is_file(), reason="the peer suite is not checked out beside the repo")
TABLE = 64
EXPECTED = {"EmbedLayerNormalization": 1, "MultiHeadAttention": 1, "FastGelu": 1, "SkipLayerNormalization": 2}


def _variant(q_scale: float = 1.0, fill: float | None = None, keep_scale: float | None = None) -> onnx.ModelProto:
    """The peer file; ``q_scale`` multiplies the Q third of the QKV weight (large scores); ``fill`` replaces the
    10000 of the masking; ``keep_scale`` multiplies the sliced table before the scores are (near-misses)."""
    model = onnx.load(PEER)
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    weight = next(t for t in model.graph.initializer if t.name == matmul.input[1])
    w = numpy_helper.to_array(weight).copy()
    w[:, : w.shape[1] // 3] *= q_scale
    weight.CopyFrom(numpy_helper.from_array(w, weight.name))
    for node in model.graph.node:
        value = numpy_helper.to_array(node.attribute[0].t) if node.op_type == "Constant" else None
        if fill is not None and value is not None and value.size == 1 and float(value.reshape(-1)[0]) == 10000.0:
            node.attribute[0].t.CopyFrom(numpy_helper.from_array(np.array(fill, np.float32)))
    if keep_scale is not None:
        softmax = next(n for n in model.graph.node if n.op_type == "Softmax")
        scores_mul = next(n for n in model.graph.node if n.op_type == "Mul" and
                          any(p.output[0] == softmax.input[0] for p in model.graph.node if p.op_type == "Sub"
                              and n.output[0] in p.input))
        keep = scores_mul.input[1]
        model.graph.initializer.append(numpy_helper.from_array(np.array(keep_scale, np.float32), "keep_scale"))
        model.graph.node.insert(list(model.graph.node).index(scores_mul),
                                onnx.helper.make_node("Mul", [keep, "keep_scale"], ["keep_scaled"]))
        scores_mul.input[1] = "keep_scaled"
    return model


def fuse(proto: onnx.ModelProto):
    model = ir.serde.deserialize_model(proto)
    result = optimize(model, OptimizeOptions(model_type="gpt2"))
    return result, model


def feeds(batch: int, seq: int, past: int, padding: str, seed: int = 0) -> dict[str, np.ndarray]:
    """A Megatron table as its users build it: causal 0/1 rows times the keys' padding; positions counted
    from the first real token; random past."""
    rng = np.random.default_rng(seed)
    total = past + seq
    keys = np.zeros((batch, TABLE), np.float32)
    for b in range(batch):
        n = total if padding == "none" or b == 0 else max(1, total // 2)
        if padding == "left":
            keys[b, total - n:total] = 1
        else:
            keys[b, :n] = 1
    table = np.tril(np.ones((TABLE, TABLE), np.float32))[None] * keys[:, None, :]
    first = np.argmax(keys[:, :total], axis=1)[:, None] if padding == "left" else 0
    positions = np.clip(np.arange(total)[None, :] - first, 0, None)[:, past:]
    return {"input_ids": rng.integers(0, 10, (batch, seq)).astype(np.int64),
            "position_ids": np.broadcast_to(positions, (batch, seq)).astype(np.int64),
            "attention_mask": table[:, None], "past_0": rng.standard_normal((2, batch, 2, past, 4)).astype(np.float32)}


CASES = [(seq, past, padding) for seq, past in ((8, 0), (40, 0), (1, 17), (8, 17), (5, 50))
         for padding in ("none", "right", "left")]


def _run(model: ir.Model | onnx.ModelProto, cases) -> list[list[np.ndarray]]:
    proto = model if isinstance(model, onnx.ModelProto) else ir.serde.serialize_model(model)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL   # the graph as written
    session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return [session.run(None, feeds(2, seq, past, padding)) for seq, past, padding in cases]


@pytest.fixture(scope="module")
def peer_fused():
    return fuse(_variant())


def test_peer_fuses_every_block(peer_fused):
    result, model = peer_fused
    assert {op: result.fusions.get(op, 0) for op in EXPECTED} == EXPECTED, result.summary_lines()
    assert all(c.complete for c in result.coverage.values()), result.summary_lines()
    assert not [n for n in model.graph if n.op_type in ("Softmax", "Sqrt", "Tanh")]


def _expose_context(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The attention's merged context (what the output projection reads) as an extra graph output: on the
    logits of this 1-layer model a changed row is diluted below fp16 noise."""
    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    peer = onnx.load(PEER).graph
    weights = {t.name for t in peer.initializer}
    dense = [n.input[1] for n in peer.node if n.op_type == "MatMul" and n.input[1] in weights][1]   # after QKV
    context = next(n for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] == dense).input[0]
    proto.graph.output.append(onnx.helper.make_tensor_value_info(context, onnx.TensorProto.FLOAT, None))
    return proto


@pytest.mark.parametrize("q_scale", [1.0, 30.0])
def test_parity_fp32_and_fp16(q_scale, peer_fused):
    original = _expose_context(_variant(q_scale))
    fused = _expose_context(ir.serde.serialize_model(peer_fused[1] if q_scale == 1.0 else fuse(_variant(q_scale))[1]))
    ref32, got32 = _run(original, CASES), _run(fused, CASES)
    ref16 = _run(to_fp16(ir.serde.deserialize_model(original)), CASES)   # the unfused graph in float16
    got16 = _run(to_fp16(ir.serde.deserialize_model(fused)), CASES)
    names = ("logits", "present_0", "context")
    for case, r32, g32, r16, g16 in zip(CASES, ref32, got32, ref16, got16):
        for ref, got, name in zip(r32, g32, names):
            assert got.shape == ref.shape
            assert np.abs(got - ref).max() <= 1e-4 + 1e-3 * np.abs(ref).max(), (case, name, "fp32")
        for ref, got, name in zip(r16, g16, names):
            # fp16 fused vs fp16 unfused, relative to the largest reference value; measured on the context at
            # q_scale 30: <= 4.2e-4 (rows that keep no key averaged), 4.7e-2 on (8, 0, left) when those rows
            # are left to the fused op's -65504 bias
            assert np.abs(got.astype(np.float64) - ref).max() <= 2e-2 * np.abs(ref).max(), (case, name, "fp16")


@pytest.mark.parametrize("variant, says", [
    ({"fill": 10.0}, "blocked score still counts"),
    ({"keep_scale": 0.5}, "not 0/1"),
])
def test_near_miss_does_not_fuse(variant, says):
    result, model = fuse(_variant(**variant))
    assert not result.fusions.get("MultiHeadAttention") and not result.fusions.get("Attention")
    assert [n for n in model.graph if n.op_type == "Softmax"]
    assert any(says in miss for miss in result.coverage["attention"].misses), result.summary_lines()


def test_synthesized_table_is_causal_with_padding():
    from mlstep.validate.inputs import synthesize_inputs

    model = ir.serde.deserialize_model(onnx.load(PEER))
    for case in synthesize_inputs(model, batch=2, sequence=8, past_sequence=17):
        table = case.feeds["attention_mask"]
        assert table.shape == (2, 1, TABLE, TABLE) and case.feeds["past_0"].shape[3] == 17
        assert set(np.unique(table)) <= {0.0, 1.0}
        assert not np.triu(table[:, 0], 1).any()                       # no query sees a later key
        keys = table[:, 0, -1, :25]                                    # the last row: the keys' padding
        if case.name == "left-padded":
            assert keys[1, 0] == 0 and keys[1, -1] == 1
        elif case.name == "right-padded":
            assert keys[1, 0] == 1 and keys[1, -1] == 0
        else:
            assert keys.all()
