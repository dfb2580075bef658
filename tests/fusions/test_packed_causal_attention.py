"""GPT-2 Conv1D attention (packed Q/K/V, stacked past) -> com.microsoft Attention (unidirectional).

The graphs are the layouts PyTorch 1.4-1.9 exported transformers 2.x-4.x GPT-2 in (and ONNX Runtime's own
generator builds), written with onnx.helper at a tiny size (hidden 16, 2 heads, a causal table of 80 rows
so that long sequences run): K^T split straight to [B, N, d, S] and concatenated after the transposed past
key ("kt", PyTorch), or K concatenated on the sequence axis and transposed after ("k", generator graphs);
the masking written ``Where(causal table, scores, -1e4)`` or ``scores * b - 1e4 * (1 - b)``, with or
without the padding bias of a 2-D float mask.
Positive: each layout fuses to one Attention and matches the original in ONNX Runtime on batch 3 with no,
right and LEFT padding, short and long sequences, past 0 and > 0 (outputs and presents).
Negative: a sliding-window table, a table whose diagonal is shifted (one future token seen) and a padding
bias that is not zero on attended tokens must not fuse, and say why.
Constant fill + padding bias (``Where(causal, s, -1e4) + pad``): exact for every real token, but not for a
left-padded token that sees nothing (no additive fused mask reproduces it). It fuses with the mask input recorded
as unspecified padding: every real token's output and the real positions of present match; parity leaves the
padded positions out and counts them, and still fails when a row that sees a key differs. With
``exact_padding`` it is refused with the blind-row reason. (ONNX Runtime's own graphs of this layout:
test_unspecified_padding.py.)
"""
from __future__ import annotations


import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from mlstep.optimizer import OptimizeOptions, optimize
from mlstep.optimizer.fusions._base import MS_DOMAIN, UNSPECIFIED_PADDING

HIDDEN, HEADS, CTX = 16, 2, 80
HEAD = HIDDEN // HEADS


def _table(kind: str) -> np.ndarray:
    """[1, 1, CTX, CTX] uint8: the causal table ("causal"), or a near-miss."""
    i, j = np.arange(CTX)[:, None], np.arange(CTX)[None, :]
    allowed = {"causal": j <= i, "window": (j <= i) & (j > i - 40), "shifted": j <= i + 1}[kind]
    return allowed.astype(np.uint8)[None, None]


def build(past: str | None, masking: str, padding: bool, table: str = "causal", pad_bias: float = 0.0,
          causal_fill: float = -1e4, seed: int = 0) -> onnx.ModelProto:
    """One GPT-2 attention block + output projection. ``past``: None, "kt" or "k"; ``masking``: "where" or
    "mul" or "add"; ``padding``: a 2-D float ``attention_mask`` input added as ``(1 - mask) * -1e4``
    (+ ``pad_bias`` on attended tokens when nonzero: a near-miss); ``causal_fill``: the Where form's fill."""
    rng = np.random.default_rng(seed)
    inits = {
        "W": rng.standard_normal((HIDDEN, 3 * HIDDEN)).astype(np.float32) * 0.3,
        "B": rng.standard_normal(3 * HIDDEN).astype(np.float32) * 0.1,
        "Wo": rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32) * 0.3,
        "Bo": rng.standard_normal(HIDDEN).astype(np.float32) * 0.1,
        "heads_shape": np.array([0, 0, HEADS, HEAD], np.int64), "merge_shape": np.array([0, 0, -1], np.int64),
        "sqrt_d": np.array(np.sqrt(HEAD), np.float32), "table": _table(table), "neg": np.array(-1e4, np.float32),
        "causal_fill": np.array(causal_fill, np.float32),
        "one": np.array(1.0, np.float32), "big": np.array(1e4, np.float32), "i0": np.array(0, np.int64),
        "i1": np.array(1, np.int64), "ax2": np.array([2], np.int64), "ax3": np.array([3], np.int64),
        "ax4": np.array([4], np.int64),
        "zero1": np.array([0], np.int64), "pad_bias": np.array(pad_bias, np.float32),
    }
    n = []

    def node(op, inputs, outputs, **attrs):
        n.append(helper.make_node(op, inputs, outputs, **attrs))
        return outputs[0]

    node("MatMul", ["x", "W"], ["xw"])
    node("Add", ["xw", "B"], ["qkv"])
    node("Split", ["qkv"], ["q", "k", "v"], axis=2, split=[HIDDEN] * 3)
    for name in "qkv":
        node("Reshape", [name, "heads_shape"], [f"{name}_r"])
    node("Transpose", ["q_r"], ["q_h"], perm=[0, 2, 1, 3])
    node("Transpose", ["v_r"], ["v_new"], perm=[0, 2, 1, 3])
    present = None
    if past is None or past == "kt":
        node("Transpose", ["k_r"], ["k_t_new"], perm=[0, 2, 3, 1])
    if past is None:
        k_t, v_all = "k_t_new", "v_new"
    elif past == "kt":
        node("Gather", ["past", "i0"], ["pk"], axis=0)
        node("Transpose", ["pk"], ["pk_t"], perm=[0, 1, 3, 2])
        k_t = node("Concat", ["pk_t", "k_t_new"], ["k_t"], axis=-1)
        node("Gather", ["past", "i1"], ["pv"], axis=0)
        v_all = node("Concat", ["pv", "v_new"], ["v_all"], axis=-2)
        node("Transpose", [k_t], ["k_back"], perm=[0, 1, 3, 2])
        node("Unsqueeze", ["k_back"], ["pres_k"], axes=[0])
        node("Unsqueeze", [v_all], ["pres_v"], axes=[0])
        present = node("Concat", ["pres_k", "pres_v"], ["present"], axis=0)
    else:
        node("Transpose", ["k_r"], ["k_new"], perm=[0, 2, 1, 3])
        node("Split", ["past"], ["pk5", "pv5"], axis=0, split=[1, 1])
        node("Squeeze", ["pk5"], ["pk"], axes=[0])
        node("Squeeze", ["pv5"], ["pv"], axes=[0])
        k_all = node("Concat", ["pk", "k_new"], ["k_all"], axis=-2)
        k_t = node("Transpose", [k_all], ["k_t"], perm=[0, 1, 3, 2])
        v_all = node("Concat", ["pv", "v_new"], ["v_all"], axis=-2)
        node("Unsqueeze", [k_all], ["pres_k"], axes=[0])
        node("Unsqueeze", [v_all], ["pres_v"], axes=[0])
        present = node("Concat", ["pres_k", "pres_v"], ["present"], axis=0)
    node("MatMul", ["q_h", k_t], ["qk"])
    node("Div", ["qk", "sqrt_d"], ["scores"])
    # the causal slice of the table: rows [ns - nd, ns), columns [0, ns)  (nd: new tokens, ns: total)
    node("Shape", ["scores"], ["s_shape"])
    node("Slice", ["s_shape", "ax2", "ax3"], ["nd1"])
    node("Slice", ["s_shape", "ax3", "ax4"], ["ns1"])
    node("Sub", ["ns1", "nd1"], ["start"])
    node("Slice", ["table", "start", "ns1", "ax2"], ["rows"])
    node("Slice", ["rows", "zero1", "ns1", "ax3"], ["causal"])
    if masking == "where":
        node("Cast", ["causal"], ["causal_b"], to=TensorProto.BOOL)
        masked = node("Where", ["causal_b", "scores", "causal_fill"], ["masked"])
    elif masking == "mul":
        node("Cast", ["causal"], ["causal_f"], to=TensorProto.FLOAT)
        node("Mul", ["scores", "causal_f"], ["kept"])
        node("Sub", ["one", "causal_f"], ["blocked"])
        node("Mul", ["blocked", "big"], ["penalty"])
        masked = node("Sub", ["kept", "penalty"], ["masked"])
    else:   # "add": one additive bias, causal + padding (transformers 4.x style)
        node("Cast", ["causal"], ["causal_f"], to=TensorProto.FLOAT)
        node("Sub", ["one", "causal_f"], ["blocked"])
        masked = node("Mul", ["blocked", "neg"], ["causal_bias"])
    if padding:
        node("Unsqueeze", ["attention_mask"], ["mask4"], axes=[1, 2])
        node("Sub", ["one", "mask4"], ["unmask"])
        node("Mul", ["unmask", "neg"], ["pad"])
        if pad_bias:
            node("Add", ["pad", "pad_bias"], ["pad_off"])
        masked = node("Add", [masked, "pad_off" if pad_bias else "pad"], ["masked_pad"])
    if masking == "add":
        masked = node("Add", ["scores", masked], ["masked_add"])
    node("Softmax", [masked], ["probs"], axis=3)
    node("MatMul", ["probs", v_all], ["ctx"])
    node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3])
    node("Reshape", ["ctx_t", "merge_shape"], ["merged"])
    node("MatMul", ["merged", "Wo"], ["proj"])
    node("Add", ["proj", "Bo"], ["out"])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    if past is not None:
        inputs.append(helper.make_tensor_value_info("past", TensorProto.FLOAT, [2, "batch", HEADS, "past_seq", HEAD]))
    if padding:
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.FLOAT, ["batch", "total_seq"]))
    outputs = [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["batch", "seq", HIDDEN])]
    if present:
        outputs.append(helper.make_tensor_value_info("present", TensorProto.FLOAT,
                                                     [2, "batch", HEADS, "total_seq", HEAD]))
    graph = helper.make_graph(n, "gpt2_block", inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)], ir_version=7)


def fuse(proto: onnx.ModelProto, exact_padding: bool = False):
    model = ir.serde.deserialize_model(proto)
    result = optimize(model, OptimizeOptions(model_type="gpt2", verbose=True, exact_padding=exact_padding))
    return result, ir.serde.serialize_model(result.model)


def _run(proto: onnx.ModelProto, feeds: dict) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v for k, v in feeds.items() if k in names})


def _feeds(batch: int, seq: int, past: int, padding: str, rng) -> dict:
    total = past + seq
    mask = np.ones((batch, total), np.float32)
    if padding == "right":
        for b in range(1, batch):
            mask[b, total - b:] = 0
    elif padding == "left":
        for b in range(1, batch):
            mask[b, :min(b * 2, total - 1)] = 0
    return {"x": rng.standard_normal((batch, seq, HIDDEN)).astype(np.float32),
            "past": rng.standard_normal((2, batch, HEADS, past, HEAD)).astype(np.float32),
            "attention_mask": mask}


LAYOUTS = [(None, "mul", False), (None, "where", False), (None, "add", False), ("kt", "where", False),
           ("kt", "mul", False), ("kt", "add", False), ("k", "where", False), ("k", "mul", False)]


# Where(causal, s, -1e9) + padding bias (-1e4): a query that sees nothing gets softmax over its padded past,
# as the fused op computes it, so the padded layouts fuse exactly
LAYOUTS += [(None, "where-1e9", True), ("kt", "where-1e9", True), ("k", "where-1e9", True)]


@pytest.mark.parametrize("past,masking,padding", LAYOUTS)
def test_fuses_with_parity(past, masking, padding):
    masking, _, fill = masking.partition("-")
    proto = build(past, masking, padding, causal_fill=-float(fill) if fill else -1e4)
    result, fused = fuse(proto)
    # the additive form with split Q/K/V inputs is also causal_attention's (MultiHeadAttention, run first)
    kinds = ("Attention",) if masking != "add" else ("Attention", "MultiHeadAttention")
    attention = [n for n in fused.graph.node if n.op_type in kinds and n.domain == MS_DOMAIN]
    assert len(attention) == 1, result.summary_lines()
    assert not [n for n in fused.graph.node if n.op_type == "Softmax"]
    attrs = {a.name: helper.get_attribute_value(a) for a in attention[0].attribute}
    assert attrs["unidirectional"] == 1 and attrs["num_heads"] == HEADS
    mask_at = 3 if attention[0].op_type == "Attention" else 4
    assert (len(attention[0].input) > mask_at and attention[0].input[mask_at] != "") == padding   # the mask
    rng = np.random.default_rng(1)
    pasts = (0, 1, 17) if past else (0,)
    compared = 0
    for p in pasts:
        for seq in (1, 5, 60):
            for pad in ("none", "right", "left") if padding else ("none",):
                feeds = _feeds(3, seq, p, pad, rng)
                want, got = _run(proto, feeds), _run(fused, feeds)
                assert len(want) == len(got)
                for w, g in zip(want, got):
                    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5, err_msg=f"past={p} seq={seq} {pad}")
                compared += 1
    assert compared >= (9 * len(pasts) if padding else 3 * len(pasts))


@pytest.mark.parametrize("masking,padding,table,pad_bias,says", [
    ("where", False, "window", 0.0, "changes visible scores"),
    ("mul", False, "shifted", 0.0, "does not block future or padded keys"),
    ("add", True, "causal", 0.5, "zero on visible tokens|changes visible scores"),
    ("add", True, "causal", 0.0, "fill is not additive"),   # -1e4 + -1e4 on a padded future key: not -inf
    # the export blocks with a constant (-1e4) and adds the padding bias on top: a query that sees nothing
    # (a left-padded token) gets softmax over {s_j - 1e4} and {-1e4}, which no additive fused mask gives
    ("where", True, "causal", 0.0, "fill is not additive"),
    ("mul", True, "causal", 0.0, "fill is not additive"),
])
@pytest.mark.parametrize("past", [None, "kt"])
def test_near_miss_does_not_fuse(masking, padding, table, pad_bias, says, past):
    # the constant-fill + padding forms fuse unless exact padding is asked for (test_constant_fill_with_padding)
    exact = says == "fill is not additive"
    result, fused = fuse(build(past, masking, padding, table=table, pad_bias=pad_bias), exact_padding=exact)
    assert not [n for n in fused.graph.node if n.domain == MS_DOMAIN and n.op_type in ("Attention",
                                                                                        "MultiHeadAttention")]
    assert [n for n in fused.graph.node if n.op_type == "Softmax"]
    assert any(say in line for line in result.summary_lines() for say in says.split("|")), result.summary_lines()


def _real(mask: np.ndarray, shape: tuple, batch_axis: int, position_axis: int) -> np.ndarray:
    """True at the output's elements whose position (the last ``shape[position_axis]`` mask entries) is real."""
    n = shape[position_axis]
    real = mask[:, mask.shape[1] - n:].astype(bool)
    view = [1] * len(shape)
    view[batch_axis], view[position_axis] = shape[batch_axis], n
    return np.broadcast_to(real.reshape(view), shape)


@pytest.mark.parametrize("masking", ["where", "mul", "add"])
@pytest.mark.parametrize("past", [None, "kt", "k"])
def test_constant_fill_with_padding_fuses_with_padded_rows_unspecified(masking, past):
    proto = build(past, masking, True)
    result, fused = fuse(proto)
    assert result.fusions.get("Attention") == 1 and result.unspecified_padding == ("attention_mask",)
    assert {p.key: p.value for p in fused.metadata_props}[UNSPECIFIED_PADDING] == "attention_mask"
    rng = np.random.default_rng(2)
    padded_differs = 0.0
    for p in (0, 1, 17) if past else (0,):
        for seq in (1, 5, 60):
            for pad in ("none", "right", "left"):
                feeds = _feeds(3, seq, p, pad, rng)
                want, got = _run(proto, feeds), _run(fused, feeds)
                for index, (w, g) in enumerate(zip(want, got)):   # out [B, S, H]; present [2, B, N, T, d]
                    real = _real(feeds["attention_mask"], w.shape, *((0, 1) if index == 0 else (1, 3)))
                    np.testing.assert_allclose(g[real], w[real], rtol=1e-4, atol=1e-5,
                                               err_msg=f"past={p} seq={seq} {pad}")
                    padded_differs = max(padded_differs, float(np.abs(g - w)[~real].max()) if (~real).any() else 0)
    assert padded_differs > 1e-3     # left-padded queries that see no key do differ: the case is real


@pytest.mark.parametrize("past", [None, "kt"])
def test_parity_leaves_out_unspecified_padding_and_fails_on_a_real_row(past, tmp_path):
    from mlstep.optimizer import io
    from mlstep.validate.parity import check_parity, parity_cases, runnable_cases

    source = tmp_path / "source.onnx"
    onnx.save(build(past, "where", True), str(source))
    result, fused = fuse(onnx.load(str(source)))
    candidate = tmp_path / "fused.onnx"
    onnx.save(fused, str(candidate))
    cases, outputs, _ = runnable_cases(source, parity_cases(io.load(source)))
    parity = check_parity(source, candidate, "fp32", cases, reference_outputs=outputs)
    assert parity.passed, (parity.worst_output, parity.worst_case, parity.max_abs_diff)
    assert parity.unspecified_padding == "attention_mask"
    assert set(parity.excluded) == ({"out"} if past is None else {"out", "present"})
    assert parity.excluded["out"][0] > 0 and parity.excluded["out"][1] > 1e-3   # they differ, and are counted
    # near miss: the fill the fused op adds to padded keys lets them through (-1, not -1e4): rows that see a
    # key differ, and parity fails although the marker is there
    attention = next(n for n in fused.graph.node if n.op_type == "Attention")
    next(a for a in attention.attribute if a.name == "mask_filter_value").f = -1.0
    onnx.save(fused, str(candidate))
    parity = check_parity(source, candidate, "fp32", cases, reference_outputs=outputs)
    assert not parity.passed and "padded" in parity.worst_case
