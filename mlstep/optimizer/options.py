"""The optimizer's options: the seed's set, plus per-fusion switches."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

MODEL_TYPES = ("auto", "bert", "gpt2", "bert_tf", "bert_keras")
OPT_LEVELS = (0, 1, 2, 99)
FUSIONS = ("gemm_to_matmul", "tensordot", "einsum", "layer_norm", "layer_norm_tf", "skip_layer_norm", "gelu",
           "fast_gelu", "attention", "embed_layer_norm")


@dataclass(frozen=True)
class OptimizeOptions:
    model_type: str = "auto"       # auto | bert | gpt2 | bert_tf | bert_keras
    num_heads: int = 0             # 0 = detect from the graph
    hidden_size: int = 0           # 0 = detect from the graph
    input_int32: bool = False      # int64 graph inputs become int32
    float16: bool = False          # also produce the fp16 variant (library: convert the result)
    use_gpu: bool = False          # validate on CUDA when it loads; GPU-friendly choices
    opt_level: int = 0             # ONNX Runtime graph optimizer pre-pass level (0 = none)
    verbose: bool = False          # per pass: what fused, what was refused and why
    exact_padding: bool = False    # refuse a fusion that differs from the export on padded queries that see no key
    disabled_fusions: frozenset[str] = field(default_factory=frozenset)

    def validate(self) -> "OptimizeOptions":
        from mlstep.errors import UsageError

        if self.model_type not in MODEL_TYPES:
            raise UsageError(f"unknown model_type {self.model_type!r} (choose from {', '.join(MODEL_TYPES)})")
        if self.opt_level not in OPT_LEVELS:
            raise UsageError(f"opt_level must be one of {OPT_LEVELS}, got {self.opt_level}")
        if self.num_heads < 0 or self.hidden_size < 0:
            raise UsageError("num_heads and hidden_size must be >= 0 (0 = detect)")
        if self.num_heads and self.hidden_size and self.hidden_size % self.num_heads:
            raise UsageError(f"num_heads {self.num_heads} does not divide hidden_size {self.hidden_size}")
        unknown = set(self.disabled_fusions) - set(FUSIONS)
        if unknown:
            raise UsageError(f"unknown fusion(s) {sorted(unknown)} (choose from {', '.join(FUSIONS)})")
        return self

    def as_params(self) -> dict[str, str]:
        """Flat string params (MLflow params, report.json)."""
        d = dataclasses.asdict(self)
        d["disabled_fusions"] = ",".join(sorted(self.disabled_fusions))
        return {k: str(v) for k, v in d.items()}

    def hash(self, extra: dict[str, str] | None = None) -> str:
        """The options' part of the registry's idempotency key (``mlstep.registry.publish.idempotency_key``).

        ``verbose`` says nothing about the result and is left out. Fields added after the first release
        (``HASHED_WHEN_SET``) and the ``extra`` settings (the step's requested form) count only when they differ
        from their defaults, so a version registered before they existed is still found by a re-run that does not
        use them."""
        params = self.as_params()
        params.pop("verbose")
        defaults = OptimizeOptions().as_params()
        for name in HASHED_WHEN_SET:
            if params.get(name) == defaults.get(name):
                params.pop(name, None)
        params.update(extra or {})
        return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


# fields added after the first release: hashed only when set (see OptimizeOptions.hash)
HASHED_WHEN_SET: tuple[str, ...] = ("exact_padding",)
