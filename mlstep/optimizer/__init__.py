"""The optimizer: load -> detect -> fusion passes -> cleanup -> save.

Library use::

    from mlstep.optimizer import OptimizeOptions, optimize_file, optimize
    result = optimize(model, OptimizeOptions(num_heads=12))   # model: onnx_ir.Model, modified in place
    result.model, result.fusions, result.log
"""
from mlstep.optimizer.options import FUSIONS, MODEL_TYPES, OptimizeOptions
from mlstep.optimizer.pipeline import OptimizeResult, optimize, optimize_file

__all__ = ["FUSIONS", "MODEL_TYPES", "OptimizeOptions", "OptimizeResult", "optimize", "optimize_file"]
