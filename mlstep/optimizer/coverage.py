"""Coverage: the transformer blocks the detector saw, per kind, and which of them a fusion took.

This is the contract between the optimizer (which fills it) and the step (whose coverage gate, warning and
report read it). A block kind is one of ``KINDS``; a miss names the block and says why it stayed unfused,
in plain words (``"layer 0: the attention scale is not a constant"``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

KINDS = ("attention", "embedding", "layer_norm", "skip_layer_norm", "gelu")


@dataclass(frozen=True)
class BlockCoverage:
    kind: str                           # one of KINDS
    detected: int                       # blocks of this kind the detector saw in the source
    fused: int                          # of those, how many a fusion took
    misses: tuple[str, ...] = field(default=())   # one line per unfused block: "<where>: <reason>"

    @property
    def complete(self) -> bool:
        return self.fused >= self.detected

    def line(self) -> str:
        """``attention 2/3: layer 1: <reason>`` (the first miss; the rest are in ``misses``)."""
        head = f"{self.kind} {self.fused}/{self.detected}"
        return head if self.complete or not self.misses else f"{head}: {self.misses[0]}"


def nothing_detected(coverage: dict[str, BlockCoverage]) -> bool:
    """True when the detector saw no transformer block at all (nothing to optimize)."""
    return not any(c.detected for c in coverage.values())


def incomplete(coverage: dict[str, BlockCoverage]) -> list[BlockCoverage]:
    return [c for c in coverage.values() if not c.complete]


# --- filling it: anchors counted before fusing, fused ops attributed after ----------------------------

# kind -> the fusion switches (FusionLog names) whose refusals explain a miss of that kind
EXPLAINED_BY = {"attention": ("attention", "causal_attention", "packed_causal_attention", "onnx_attention"),
                "embedding": ("embed_layer_norm",), "layer_norm": ("layer_norm", "layer_norm_tf"),
                "skip_layer_norm": ("skip_layer_norm",), "gelu": ("gelu", "fast_gelu", "onnx_gelu")}
# kind -> the fused ops that take a block of that kind (a LayerNorm taken into SkipLN / EmbedLN is fused too)
FUSED_AS = {"attention": ("Attention", "MultiHeadAttention"), "embedding": ("EmbedLayerNormalization",),
            "layer_norm": ("LayerNormalization", "SkipLayerNormalization", "EmbedLayerNormalization"),
            "skip_layer_norm": ("SkipLayerNormalization",), "gelu": ("Gelu", "BiasGelu", "FastGelu")}


@dataclass(frozen=True)
class Census:
    """The candidate anchors of each block kind in the prepared source, before any fusion, in graph order:
    attention = Softmax (or ONNX's Attention op); layer_norm = LayerNormalization or a decomposed mean subtraction
    ``x - mean(x)``;
    skip_layer_norm = a layer norm of a sum of two activations (a residual), less the embedding's;
    gelu = Erf, a Tanh of a cubic (``x + 0.044715 x^3``) or ONNX's Gelu op; embedding = a layer norm of a sum that
    reads a word-embedding table (a Gather of a 2-D integer graph input), one per embedding (encoders: GPT-2's embedding
    sum is a skip layer norm's input), or such a sum the source already feeds to a fused SkipLayerNormalization
    (ONNX Runtime's GPT-2 embedding test graphs)."""

    anchors: dict[str, list]      # kind -> anchor nodes

    def counts(self) -> dict[str, int]:
        return {kind: len(nodes) for kind, nodes in self.anchors.items()}


def census(model, model_type: str) -> Census:
    graph = model.graph
    # ONNX's own Attention / Gelu (opset 23 / 20) left as they are by standard_ops are blocks too
    softmax = [n for n in graph if n.op_type in ("Softmax", "Attention") and n.domain in ("", "ai.onnx")]
    norms = [n for n in graph if n.op_type == "LayerNormalization"] + \
        [n for n in graph if n.op_type == "ReduceMean" and _subtracted_from_input(n)]
    gelu = [n for n in graph if n.op_type == "Erf" or (n.op_type == "Tanh" and _has_cube(n.inputs[0], 4))
            or (n.op_type == "Gelu" and n.domain in ("", "ai.onnx"))]
    residual = [n for n in norms if _sum_of_activations(n.inputs[0])]
    # one embedding block per layer norm whose summed input reads a word-embedding table (several embeddings in
    # one graph are several blocks); GPT-2's embedding sum is its first skip layer norm's input
    embedding = [] if model_type == "gpt2" else [n for n in residual if _sums_an_embedding(n.inputs[0], graph)]
    skip = [n for n in residual if n not in embedding]
    # an embedding sum the source already feeds to a fused SkipLayerNormalization is an embedding block too
    embedding += [n for n in graph if n.op_type == "SkipLayerNormalization" and n.domain == "com.microsoft"
                  and any(_sums_an_embedding(v, graph) for v in n.inputs[:2])]
    return Census({"attention": softmax, "embedding": embedding, "layer_norm": norms, "skip_layer_norm": skip,
                   "gelu": gelu})


def tally(found: Census, model, fused_ops: dict[str, int], reasons) -> dict[str, BlockCoverage]:
    """Coverage per kind: anchors seen, fused ops attributed (at most one per anchor), a reason per miss.
    ``reasons(kind)``: the refusals of the fusions of that kind (``"<rule> at <node>: <why>"``), asked only
    for a kind that missed a block."""
    alive = {id(n) for n in model.graph}
    out = {}
    for kind in KINDS:
        anchors = found.anchors[kind]
        taken = sum(fused_ops.get(op, 0) for op in FUSED_AS[kind])
        if kind == "skip_layer_norm":   # an EmbedLayerNormalization beyond the embedding blocks took a sum's norm
            taken += max(0, fused_ops.get("EmbedLayerNormalization", 0) - len(found.anchors["embedding"]))
        fused = min(len(anchors), taken)
        misses: list[str] = []
        if fused < len(anchors):
            left = [(i, n) for i, n in enumerate(anchors) if id(n) in alive] or list(enumerate(anchors))
            kind_reasons = reasons(kind) or []
            for i, node in left[:len(anchors) - fused]:
                where = f"layer {i}" if kind == "attention" else (node.name or node.op_type)
                misses.append(f"{where}: {_reason_for(node, kind_reasons)}")
        out[kind] = BlockCoverage(kind, len(anchors), fused, tuple(misses))
    return out


def _reason_for(node, reasons: list[str]) -> str:
    """The refusal that names this block's nodes, else the first refusal of the kind, else a plain default."""
    name = node.name or ""
    scope = name.rsplit("/", 1)[0] if "/" in name else ""
    for reason in reasons:
        if scope and scope in reason:
            return reason.split(": ", 1)[-1]
    if reasons:
        return reasons[0].split(": ", 1)[-1]
    return "no rule of this kind matched the block's layout (not a form the fusions know)"


def _producer(value, op_type: str):
    node = value.producer() if value is not None else None
    return node if node is not None and node.op_type == op_type else None


def _subtracted_from_input(mean) -> bool:
    """ReduceMean(x) used in Sub(x, mean(x)): a decomposed LayerNorm's centring (PyTorch < 17, tf2onnx)."""
    x = mean.inputs[0]
    return any(user.op_type == "Sub" and user.inputs[0] is x and user.inputs[1] is mean.outputs[0]
               for user, _ in mean.outputs[0].uses())


def _is_constant(value) -> bool:
    return value is not None and (value.const_value is not None or
                                  (value.producer() is not None and value.producer().op_type == "Constant"))


def _sum_of_activations(value) -> bool:
    add = _producer(value, "Add")
    return add is not None and not any(_is_constant(v) for v in add.inputs)


def _has_cube(value, depth: int) -> bool:
    """A Pow(x, 3) or Mul(Mul(x, x), x) within ``depth`` producers (FastGelu / gelu_new's tanh argument)."""
    stack = [(value, 0)]
    while stack:
        v, d = stack.pop()
        node = v.producer() if v is not None else None
        if node is None or d > depth:
            continue
        if node.op_type == "Pow":
            return True
        if node.op_type == "Mul" and any(_producer(i, "Mul") is not None and
                                         node.inputs[0] in _producer(i, "Mul").inputs for i in node.inputs[1:]):
            return True
        stack.extend((i, d + 1) for i in node.inputs)
    return False


def _sums_an_embedding(value, graph, depth: int = 4) -> bool:
    """True when ``value`` is a sum (through Add, Cast, Dropout) with a word-embedding Gather among its terms."""
    node = value.producer() if value is not None else None
    if node is None or depth < 0:
        return False
    if _word_embedding(node, graph):
        return True
    if node.op_type in ("Add", "Cast", "Dropout", "Identity"):
        return any(_sums_an_embedding(v, graph, depth - 1) for v in node.inputs[:2] if v is not None)
    return False


def _word_embedding(node, graph) -> bool:
    if node.op_type != "Gather" or len(node.inputs) < 2:
        return False
    table, ids = node.inputs[0], node.inputs[1]
    while ids is not None and ids not in graph.inputs and _producer(ids, "Cast") is not None:
        ids = ids.producer().inputs[0]
    return table is not None and table.const_value is not None and len(table.const_value.shape) == 2 and \
        ids is not None and ids in graph.inputs and ids.shape is not None and len(ids.shape) == 2
