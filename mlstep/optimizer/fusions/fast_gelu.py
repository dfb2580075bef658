from mlstep.optimizer.fusions._base import Fusion

FUSION = Fusion("fast_gelu", lambda ctx: [])  # being written
