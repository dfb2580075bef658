"""The variants of the optimized model, named by what they are: fp32 (the optimized graph) and fp16
(converted by :mod:`mlstep.precision`, graph signature kept in float32).

A source that is already float16 (most of its float weights are float16) gets no "fp32" variant: the
optimized graph *is* an fp16 model, so it is the fp16 variant and it is held to fp16 tolerances. Asking
only for fp32 of an fp16 source is a usage error (exit 2): upcasting would not give fp32 accuracy back.

    names, notes = plan(("fp32", "fp16"), source_precision(model))   # ("fp16",), ["no fp32 variant: ..."]
    paths, fusions = build_variants(optimized.model, names, staging, source="fp16")
"""
from __future__ import annotations

from pathlib import Path

import onnx_ir as ir

from mlstep.errors import UsageError

PRECISIONS = ("fp32", "fp16")
MODEL_FILE = "model.onnx"


def source_precision(model: ir.Model) -> str:
    """``fp16`` when float16 weights outweigh float32 ones (by bytes), else ``fp32``."""
    sizes = {ir.DataType.FLOAT: 0, ir.DataType.FLOAT16: 0}
    for value in model.graph.initializers.values():
        if value.dtype in sizes and value.const_value is not None:
            sizes[value.dtype] += value.const_value.nbytes
    return "fp16" if sizes[ir.DataType.FLOAT16] > sizes[ir.DataType.FLOAT] else "fp32"


def plan(requested: tuple[str, ...], source: str) -> tuple[tuple[str, ...], list[str]]:
    """(the variants to build, notes for the report) for the requested precisions and the source's."""
    if source != "fp16":
        return requested, []
    if "fp16" not in requested:
        raise UsageError("the source is already float16: an fp32 variant would be an fp16 model labelled fp32; "
                         "use --precision fp16")
    notes = ["no fp32 variant: the source is float16 (its optimized graph is the fp16 variant)"] \
        if "fp32" in requested else []
    return ("fp16",), notes


def build_variants(model: ir.Model, precisions: tuple[str, ...], directory: Path,
                   source: str = "fp32") -> tuple[dict[str, Path], dict[str, dict]]:
    """Save each variant as ``directory/<precision>/model.onnx``; return paths and fused-op counts.

    fp32 is the optimized model; fp16 is converted from it (a new model; the fp32 one is saved first), or,
    for a float16 ``source``, the optimized model itself.
    """
    from mlstep.optimizer import io
    from mlstep.optimizer.passes import count_fused_ops
    from mlstep.precision import to_fp16

    paths, fusions = {}, {}
    for name in precisions:
        if name == "fp32" and source == "fp16":
            raise UsageError("no fp32 variant of a float16 source")
        variant = to_fp16(model, keep_io_types=True) if name == "fp16" and source != "fp16" else model
        paths[name] = io.save(variant, Path(directory) / name / MODEL_FILE)
        fusions[name] = dict(count_fused_ops(variant))
    return paths, fusions


def precision_facts(path: Path) -> dict:
    """What the conversion kept in float32 by measurement (read from the written variant's metadata)."""
    import onnx

    from mlstep.precision import KEPT_KEY, read_kept

    proto = onnx.load(str(path), load_external_data=False)
    return read_kept(next((p.value for p in proto.metadata_props if p.key == KEPT_KEY), None))
