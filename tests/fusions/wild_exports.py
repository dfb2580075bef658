"""Exports in layouts users get in the wild, made at test time:

* the attention scale computed at run time, as transformers 4.x (Hugging Face Optimum) makes them: sdpa is
  called without ``scale=``, so the TorchScript exporter emits ``Cast(Div(1, Sqrt(Cast(Slice(Shape(Q), -1:)))))``
  applied as ``Mul(Q, sqrt(s))`` and ``Mul(K^T, sqrt(s))``;
* dynamo exports with ``Dim.AUTO`` on every input: each input gets its own batch symbol (``s21`` / ``s52``).
"""
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



def export_encoder_auto_dims(family: str, path: Path, heads: int, head_size: int, token_type_ids: bool = False) -> Path:
    """dynamo 18, sdpa, 2 layers, every input axis ``Dim.AUTO`` (separate batch symbols per input)."""
    import warnings

    import torch

    from mlstep.export import build_model, tiny_config

    hidden = heads * head_size
    model = build_model(tiny_config(family, "sdpa", hidden_size=hidden, num_attention_heads=heads,
                                    intermediate_size=2 * hidden))
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_type_ids else [])

    class Wrapper(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, *inputs):
            return self.inner(**dict(zip(names, inputs))).last_hidden_state

    args = (torch.randint(3, 50, (2, 8)), torch.ones(2, 8, dtype=torch.int64),
            torch.zeros(2, 8, dtype=torch.int64))[:len(names)]
    auto = torch.export.Dim.AUTO
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(Wrapper().eval(), args, input_names=names, output_names=["last_hidden_state"],
                                    opset_version=18, dynamo=True, verbose=False,
                                    dynamic_shapes=(tuple({0: auto, 1: auto} for _ in names),))
        program.save(str(path))
    return path
