"""The optimizer pipeline, readable as a list: each step takes the model and returns it (in place)."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common

from mlstep.errors import UsageError
from mlstep.optimizer import io
from mlstep.optimizer.coverage import EXPLAINED_BY, BlockCoverage, census, tally
from mlstep.optimizer.detect import Detected, detect
from mlstep.optimizer.fusions import FUSION_ORDER
from mlstep.optimizer.fusions._base import (MS_DOMAIN, UNSPECIFIED_PADDING, FusionContext, FusionLog,
                                             explain_misses, run_fusion)
from mlstep.optimizer.options import OptimizeOptions
from mlstep.optimizer.passes import input_int32, ort_prepass, prepare, count_fused_ops
from mlstep.optimizer import standard_ops


@dataclass
class OptimizeResult:
    model: ir.Model
    detected: Detected
    fusions: dict[str, int]                 # fused op type -> count in the result
    log: list[FusionLog] = field(default_factory=list)
    seconds: float = 0.0
    coverage: dict[str, BlockCoverage] = field(default_factory=dict)   # kind -> blocks seen / fused
    repairs: tuple[str, ...] = ()           # what io.load repaired in the source (as ONNX Runtime reads it)
    # mask inputs whose zero positions the fused attention defines differently from the export (queries that see
    # no key); recorded in the model's metadata_props too (UNSPECIFIED_PADDING), where parity reads it
    unspecified_padding: tuple[str, ...] = ()

    @property
    def notes(self) -> list[str]:
        """What the fusions decided that the report must say (not a miss, not a repair)."""
        return [f"attention fused although rows that see no key differ: the zero positions of {name!r} (padding) "
                "are unspecified in the fused model (parity leaves them out; --exact-padding refuses the fusion)"
                for name in self.unspecified_padding]

    @property
    def model_type(self) -> str:
        return self.detected.model_type

    def summary_lines(self) -> list[str]:
        """Coverage per block kind (``attention 1/2: layer 1: <reason>``), then each fusion's count; a fusion
        that fused nothing says why (its refusals, its kind's miss, or that the graph has no such form)."""
        lines = [f"repaired on load: {repair}" for repair in self.repairs] + list(self.detected.notes) + self.notes
        lines += [c.line() for c in self.coverage.values() if c.detected or c.fused]
        misses = {name: c.misses[0] for c in self.coverage.values() if c.misses
                  for name in EXPLAINED_BY.get(c.kind, ())}
        for entry in self.log:
            line = f"{entry.name}: fused {entry.fused}"
            if not entry.fused:
                first = entry.refused[0].split(": ", 1)[-1] if entry.refused else None
                line += f" ({first or misses.get(entry.name) or 'nothing (left) of this form in the graph'})"
            lines.append(line)
        for entry in self.log:
            lines += [f"  refused: {reason}" for reason in entry.refused]
        for c in self.coverage.values():
            lines += [f"  unfused {c.kind}: {miss}" for miss in c.misses[1:]]
        return lines


def optimize(model: ir.Model, options: OptimizeOptions = OptimizeOptions(), source_dir: Path | None = None,
             sequence_lengths: tuple[int, ...] = ()) -> OptimizeResult:
    """Fuse ``model`` in place and return it with what was detected and fused. ``sequence_lengths``: the lengths
    the model will be run at (the step's validation and benchmark shapes); masks are probed there too."""
    start = time.perf_counter()
    options.validate()
    if options.opt_level:
        model = ort_prepass(model, options.opt_level, options.use_gpu, source_dir)
    prepare(model)
    expansions, log = standard_ops.expand(model)    # ONNX's Gelu / Attention as the forms the fusions take
    detected = detect(model, options)
    blocks = census(model, detected.model_type)     # the blocks to fuse, counted before any fusion
    ctx = FusionContext(detected.model_type, detected.num_heads, detected.hidden_size, options.use_gpu,
                        tuple(sequence_lengths), options.exact_padding)
    traced = {}
    for fusion in FUSION_ORDER:
        if fusion.name in options.disabled_fusions:
            log.append(FusionLog(fusion.title, refused=["disabled by option"]))
            continue
        log.append(run_fusion(fusion, model, ctx, explain=options.verbose))
        kind = _kind_of(fusion.title, ctx.model_type)
        if not options.verbose and kind and not _complete(blocks, model, kind):
            # a block of its kind is left: ask why now, before a later fusion changes the graph
            traced[fusion.title] = explain_misses(fusion, model, ctx) or \
                explain_misses(fusion, model, ctx, unmatched=True)
    standard_ops.restore(model, expansions)         # an expansion no fusion took: the standard op again
    coverage = tally(blocks, model, count_fused_ops(model), _miss_reasons(ctx.model_type, log, traced))
    if options.input_int32:
        input_int32(model)
    _cleanup(model)
    unspecified = record_unspecified_padding(model)
    return OptimizeResult(model, detected, count_fused_ops(model), log, time.perf_counter() - start, coverage,
                          unspecified_padding=unspecified)


def record_unspecified_padding(model: ir.Model) -> tuple[str, ...]:
    """The mask inputs fused nodes name as padding they define differently (UNSPECIFIED_PADDING), moved from the
    nodes to the model's metadata_props (comma-separated), where every variant written from it carries them."""
    names = []
    for node in model.graph:
        name = node.metadata_props.pop(UNSPECIFIED_PADDING, None)
        if name and name not in names:
            names.append(name)
    if names:
        model.metadata_props[UNSPECIFIED_PADDING] = ",".join(names)
    return tuple(names)


def _kind_of(title: str, model_type: str) -> str | None:
    """The block kind a fusion's refusals explain (attention: the family's own form, encoder or causal)."""
    if title in ("attention", "causal_attention", "packed_causal_attention"):
        return "attention" if (title != "attention") == (model_type == "gpt2") else None
    return next((kind for kind, titles in EXPLAINED_BY.items() if title in titles), None)


def _complete(blocks, model: ir.Model, kind: str) -> bool:
    return tally(blocks, model, count_fused_ops(model), lambda _: [])[kind].complete


def _miss_reasons(model_type: str, log: list[FusionLog], traced: dict[str, list[str]]):
    """kind -> the refusals that explain its unfused blocks: the log's (verbose) or those traced right after the
    fusion ran (only where it left a block of its kind: a fully fused model pays nothing)."""
    def reasons(kind: str) -> list[str]:
        lines = [line for entry in log if _kind_of(entry.name, model_type) == kind
                 for line in (entry.refused or traced.get(entry.name, []))]
        # a fusion whose check refused the block says more than one whose pattern did not fit it at all
        return sorted(lines, key=lambda line: "layout not recognised" in line)

    return reasons


def optimize_file(path: str | Path, options: OptimizeOptions = OptimizeOptions()) -> OptimizeResult:
    path = Path(path)
    loaded = io.load_with_repairs(path)
    result = optimize(loaded.model, options, source_dir=path.parent)
    result.repairs = loaded.repairs
    return result


def _cleanup(model: ir.Model) -> None:
    for node in model.graph:  # shapes annotated by rebase_shapes on untyped values are not serialisable
        for value in node.outputs:
            if value.type is None and value.shape is not None and not value.is_graph_output():
                value.shape = None
    for pass_ in (common.RemoveUnusedNodesPass(), common.CommonSubexpressionEliminationPass(),
                  common.RemoveUnusedNodesPass(), common.TopologicalSortPass(), common.RemoveUnusedOpsetsPass()):
        pass_(model)
    if any(node.domain == MS_DOMAIN for node in model.graph):
        model.opset_imports.setdefault(MS_DOMAIN, 1)


__all__ = ["OptimizeResult", "optimize", "optimize_file", "UsageError"]
