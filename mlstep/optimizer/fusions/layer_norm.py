from mlstep.optimizer.fusions._base import Fusion

FUSION = Fusion("layer_norm", lambda ctx: [])  # being written
