"""The fusions, in the order the pipeline applies them (one file each).

Order matters only where one fusion's output is another's input: decomposed LayerNorm first (so the
others see LayerNormalization), GELU forms, attention, the embedding, then residual Add + LayerNorm.
"""
from mlstep.optimizer.fusions.attention import FUSION as ATTENTION
from mlstep.optimizer.fusions.embed_layer_norm import FUSION as EMBED_LAYER_NORM
from mlstep.optimizer.fusions.fast_gelu import FUSION as FAST_GELU
from mlstep.optimizer.fusions.gelu import FUSION as GELU
from mlstep.optimizer.fusions.layer_norm import FUSION as LAYER_NORM
from mlstep.optimizer.fusions.skip_layer_norm import FUSION as SKIP_LAYER_NORM

FUSION_ORDER = [LAYER_NORM, GELU, FAST_GELU, ATTENTION, EMBED_LAYER_NORM, SKIP_LAYER_NORM]
