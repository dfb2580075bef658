"""What every fusion file provides, and the shared helpers of the pattern language.

A fusion is a named list of onnxscript rewrite rules (pattern / check / rewrite). ``run_fusion`` applies
them and, when asked, traces the near-misses that remain so that ``verbose`` can say *why* a subgraph
did not fuse.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern
from onnxscript.rewriter._basics import MatchStatus

MS_DOMAIN = "com.microsoft"
# A fused node's (then the model's) metadata key: the graph input whose zero positions are padding the fused op
# defines differently from the export (rows that see no key; see probe.causal_masking). Parity leaves them out.
UNSPECIFIED_PADDING = "mlstep.unspecified_padding"


@dataclass
class FusionContext:
    """Facts the fusions share: detected (or given) sizes, the model type, options."""

    model_type: str
    num_heads: int = 0
    hidden_size: int = 0
    use_gpu: bool = False
    sequence_lengths: tuple[int, ...] = ()   # the user's sequence lengths: masks are probed there too
    exact_padding: bool = False              # refuse a fusion that differs on padded queries that see no key


@dataclass
class FusionLog:
    name: str
    fused: int = 0
    refused: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Fusion:
    """A fusion: its switch name and a factory of rules (rules may depend on the context)."""

    name: str
    rules: Callable[[FusionContext], Sequence[pattern.RewriteRule]]
    commute: bool = True
    anchor: str = ""        # an op every match contains; a graph without it is skipped without matching
    after: Callable[[ir.Model], None] | None = None   # a clean-up the rewrite needs (e.g. rewiring outputs)
    label: str = ""         # the name in logs when several fusions share one switch name

    @property
    def title(self) -> str:
        return self.label or self.name


def run_fusion(fusion: Fusion, model: ir.Model, ctx: FusionContext, explain: bool = False) -> FusionLog:
    if fusion.anchor and not any(node.op_type == fusion.anchor for node in model.graph):
        return FusionLog(fusion.title)
    rule_list = list(fusion.rules(ctx))
    if not rule_list:
        return FusionLog(fusion.title, refused=["no rules for this model type"])
    rules = pattern.RewriteRuleSet(rule_list, commute=fusion.commute)
    log = FusionLog(fusion.title, fused=rules.apply_to_model(model))
    if fusion.after is not None and log.fused:
        fusion.after(model)
    if explain:
        log.refused += explain_misses(fusion, model, ctx)
    return log


def explain_misses(fusion: Fusion, model: ir.Model, ctx: FusionContext, unmatched: bool = False) -> list[str]:
    """Why what is left did not fuse: each failed check's reason (``"<rule> at <node>: <why>"``); with
    ``unmatched``, where no check was reached, the structural mismatch of the best partial matches. Runs the rules once more with a tracer
    (a no-op on a graph they already rewrote), so it costs a match pass: callers ask only when needed."""
    if fusion.anchor and not any(node.op_type == fusion.anchor for node in model.graph):
        return []
    rule_list = list(fusion.rules(ctx))
    if not rule_list:
        return ["no rules for this model type"]
    tracer = pattern.MatchingTracer()
    pattern.RewriteRuleSet(rule_list, commute=fusion.commute).apply_to_model(model, tracer=tracer)
    failed, mismatched, seen = [], [], set()
    for rule, infos in tracer.best_matches_map.items():
        for info in infos:
            reason = info.match_result.reason
            if not reason or info.status not in (MatchStatus.CONDITION_FAILED, MatchStatus.NO_MATCH):
                continue
            where = info.root_node.name or info.root_node.op_type
            if info.status == MatchStatus.NO_MATCH:
                reason = f"layout not recognised ({reason})"
            line = f"{rule.name or fusion.name} at {where}: {reason}"
            if line not in seen:
                seen.add(line)
                (failed if info.status == MatchStatus.CONDITION_FAILED else mismatched).append(line)
    return failed or (mismatched if unmatched else [])


# --- small vocabulary shared by the pattern files -------------------------------------------------

def const_array(value: ir.Value | None) -> np.ndarray | None:
    """The constant behind a value (initializer or Constant), else None."""
    if value is None:
        return None
    tensor = ir.convenience.get_const_tensor(value)
    return None if tensor is None else tensor.numpy()


def const_shape(value: ir.Value | None) -> tuple[int, ...] | None:
    """The shape of an initializer (or Constant) without reading its data; None if not constant."""
    if value is None:
        return None
    if value.const_value is not None:
        return tuple(value.const_value.shape)
    arr = const_array(value)
    return None if arr is None else tuple(arr.shape)


def const_scalar(value: ir.Value | None) -> float | None:
    arr = const_array(value)
    if arr is None or arr.size != 1:
        return None
    return float(arr.reshape(-1)[0])


def attention_scale(q_scaled: bool, k_scaled: bool, s_scaling: str, q_scale, k_scale, s_scale) -> float | None:
    """The effective softmax scale of a matched attention: the product of the factors applied to Q, to K^T and
    to the scores (``s_scaling`` is "div", "mul" or "none"); None if one is not the same number for every input.

    The value analysis decides (values.py): a literal constant, or a scale the export computes at run time from
    the head size (transformers 4.x: ``Mul(Q, sqrt(s))``, ``Mul(K^T, sqrt(s))`` with
    ``s = 1 / sqrt(float(Shape(Q)[-1]))``)."""
    from mlstep.optimizer.values import facts

    used = [v for flag, v in ((q_scaled, q_scale), (k_scaled, k_scale), (s_scaling != "none", s_scale)) if flag]
    if any(v is None for v in used):
        return None
    known = facts(used[0].graph, until=used) if any(const_scalar(v) is None for v in used) else None
    scalar = known.scalar if known is not None else const_scalar
    scale = 1.0
    for flag, value in ((q_scaled, q_scale), (k_scaled, k_scale)):
        if flag:
            factor = scalar(value)
            if factor is None:
                return None
            scale *= factor
    if s_scaling != "none":
        factor = scalar(s_scale)
        if factor is None or factor == 0:
            return None
        scale = scale / factor if s_scaling == "div" else scale * factor
    return scale


def is_scalar_close(value: ir.Value | None, expected: float, rtol: float = 1e-3) -> bool:
    got = const_scalar(value)
    return got is not None and abs(got - expected) <= rtol * abs(expected) + 1e-12


def last_axis(node_or_attr_value: int | Sequence[int] | None, rank: int | None) -> bool:
    """True when an axis (or a one-element axes list) denotes the last axis."""
    if node_or_attr_value is None:
        return False
    axes = list(node_or_attr_value) if isinstance(node_or_attr_value, (list, tuple)) else [node_or_attr_value]
    if len(axes) != 1:
        return False
    axis = axes[0]
    return axis == -1 or (rank is not None and axis == rank - 1)


def vector_input(op, value: ir.Value, name: str | None = None) -> ir.Value:
    """A 1-D constant as a fused op's scale/shift/bias input wants it: the value itself when already 1-D, else
    a new initializer reshaped from it (e.g. a [1, 1, H] constant)."""
    arr = const_array(value)
    if arr is not None and arr.ndim == 1:
        return value
    return op.initializer(ir.tensor(vector_of(value), name=name or f"{value.name}_1d"))


def vector_of(value: ir.Value | None, length: int | None = None) -> np.ndarray | None:
    """A 1-D constant (optionally of a given length), e.g. a bias or a LayerNorm scale."""
    arr = const_array(value)
    if arr is None:
        return None
    arr = arr.reshape(-1) if arr.ndim > 1 and all(d == 1 for d in arr.shape[:-1]) else arr
    if arr.ndim != 1 or (length is not None and arr.shape[0] != length):
        return None
    return arr


def shape_tail(shape: ir.Value) -> list[int | None]:
    """The last two entries of a 4-element reshape target (constant or Concat of pieces, possibly behind Casts);
    None = unknown."""
    arr = const_array(shape)
    if arr is not None:
        return [int(x) for x in arr.reshape(-1)][-2:] if arr.size == 4 else []
    node = shape.producer()
    while node is not None and node.op_type == "Cast" and node.inputs[0] is not None:   # tf2onnx: int32 <-> int64
        node = node.inputs[0].producer()
    if node is None or node.op_type != "Concat":
        return []
    pieces: list[int | None] = []
    for inp in node.inputs:
        arr = const_array(inp)
        if arr is None:
            pieces.append(None)
        else:
            pieces += [int(x) for x in arr.reshape(-1)]
    return pieces[-2:] if len(pieces) == 4 else []
