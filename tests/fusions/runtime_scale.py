"""Exports with the attention scale computed at run time, as transformers 4.x (Hugging Face Optimum) makes
them: sdpa is called without ``scale=``, so the TorchScript exporter emits
``Cast(Div(1, Sqrt(Cast(Slice(Shape(Q), -1:)))))`` applied as ``Mul(Q, sqrt(s))`` and ``Mul(K^T, sqrt(s))``."""
from __future__ import annotations

import contextlib
from pathlib import Path


@contextlib.contextmanager
def sdpa_without_scale():
    """transformers 5 passes ``scale=`` to sdpa; 4.x did not. Drop it (the default is the same number)."""
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention

    def without_scale(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, **kw)

    F.scaled_dot_product_attention = without_scale
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def export_encoder_runtime_scale(family: str, opset: int, path: Path) -> Path:
    from mlstep.export import build_model, export_encoder, tiny_config

    with sdpa_without_scale():
        return export_encoder(build_model(tiny_config(family, "sdpa")), path, "torchscript", opset)


def export_gpt2_runtime_scale(with_past: bool, path: Path, n_layer: int = 2) -> Path:
    from mlstep.export import build_gpt2, export_gpt2, tiny_gpt2_config

    with sdpa_without_scale():
        return export_gpt2(build_gpt2(tiny_gpt2_config("sdpa", n_layer=n_layer)), path, "torchscript", 14,
                           with_past=with_past)

