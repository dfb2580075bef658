"""The fusions, in the order the pipeline applies them (one file each).

Order matters only where one fusion's output is another's input: flattened Gemms (and TF's flattened
tensordot MatMuls, and Einsums) back to 3-D MatMul and decomposed LayerNorms (PyTorch's and TF's forms) first,
so that the others see one form; then GELU forms, attention (encoder, then causal with split Q/K/V, then causal
with packed Q/K/V and stacked past: Conv1D-era GPT-2), the embedding, and last the residual Add + LayerNorm.
"""
from mlstep.optimizer.fusions.attention import FUSION as ATTENTION
from mlstep.optimizer.fusions.causal_attention import FUSION as CAUSAL_ATTENTION
from mlstep.optimizer.fusions.einsum import FUSION as EINSUM
from mlstep.optimizer.fusions.packed_causal_attention import FUSION as PACKED_CAUSAL_ATTENTION
from mlstep.optimizer.fusions.embed_layer_norm import FUSION as EMBED_LAYER_NORM
from mlstep.optimizer.fusions.fast_gelu import FUSION as FAST_GELU
from mlstep.optimizer.fusions.gelu import FUSION as GELU
from mlstep.optimizer.fusions.gemm_to_matmul import FUSION as GEMM_TO_MATMUL
from mlstep.optimizer.fusions.layer_norm import FUSION as LAYER_NORM
from mlstep.optimizer.fusions.layer_norm_tf import FUSION as LAYER_NORM_TF
from mlstep.optimizer.fusions.skip_layer_norm import FUSION as SKIP_LAYER_NORM
from mlstep.optimizer.fusions.tensordot import FUSION as TENSORDOT

FUSION_ORDER = [GEMM_TO_MATMUL, TENSORDOT, EINSUM, LAYER_NORM, LAYER_NORM_TF, GELU, FAST_GELU, ATTENTION,
                CAUSAL_ATTENTION, PACKED_CAUSAL_ATTENTION, EMBED_LAYER_NORM, SKIP_LAYER_NORM]
