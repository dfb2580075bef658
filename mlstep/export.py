"""Export transformers models to ONNX the way users do today (TorchScript or dynamo exporter).

Used by tests, benchmarks, examples and ``make demo``; the optimizer itself never imports torch.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

ENCODER_FAMILIES = ("bert", "distilbert", "roberta", "albert")
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            vocab_size=99, max_position_embeddings=64)


@dataclass(frozen=True)
class ExportSpec:
    family: str                 # bert | distilbert | roberta | albert
    exporter: str = "dynamo"    # dynamo | torchscript
    opset: int = 18
    attention: str = "sdpa"     # sdpa | eager
    token_type_ids: bool = True

    @property
    def key(self) -> str:
        return f"{self.family}-{self.exporter}{self.opset}-{self.attention}" + ("" if self.token_type_ids else "-nott")


@dataclass(frozen=True)
class Head:
    """A task head ``mlstep export`` keeps: the transformers mapping that names its class per family, the
    Auto class that builds it, and its outputs with their dynamic axes."""

    task: str
    mapping: str                        # transformers.models.auto.modeling_auto.<mapping>[model_type]
    auto_class: str
    outputs: tuple[str, ...]
    axes: tuple[tuple[str, ...], ...]   # per output: names of its leading dynamic axes


HEADS = (
    Head("base model", "MODEL_MAPPING_NAMES", "AutoModel", ("last_hidden_state",), (("batch", "sequence"),)),
    Head("sequence classification", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
         "AutoModelForSequenceClassification", ("logits",), (("batch",),)),
    Head("token classification", "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification",
         ("logits",), (("batch", "sequence"),)),
    Head("question answering", "MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", "AutoModelForQuestionAnswering",
         ("start_logits", "end_logits"), (("batch", "sequence"), ("batch", "sequence"))),
    Head("masked LM", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM", ("logits",),
         (("batch", "sequence"),)),
)
GPT2_ARCHITECTURES = ("GPT2LMHeadModel", "GPT2Model")    # causal LM head, base model


def head_for(model_type: str, architecture: str | None) -> Head | None:
    """The head ``architecture`` (config.json's ``architectures[0]``) names for an encoder family; None when
    mlstep does not export it. No architecture: the base model."""
    from transformers.models.auto import modeling_auto

    if not architecture:
        return HEADS[0]
    return next((h for h in HEADS if getattr(modeling_auto, h.mapping).get(model_type) == architecture), None)


def tiny_config(family: str, attention: str = "sdpa", **overrides):
    """A small random-weight transformers config of the given family."""
    import transformers as tf

    kw = dict(TINY)
    if family == "bert":
        cfg = tf.BertConfig(**kw)
    elif family == "roberta":
        cfg = tf.RobertaConfig(**{**kw, "max_position_embeddings": 70})
    elif family == "albert":
        cfg = tf.AlbertConfig(**kw, embedding_size=16)
    elif family == "distilbert":
        cfg = tf.DistilBertConfig(vocab_size=kw["vocab_size"], dim=kw["hidden_size"], n_layers=2, n_heads=4,
                                  hidden_dim=kw["intermediate_size"], max_position_embeddings=64)
    else:
        raise ValueError(f"unknown family {family!r}")
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg._attn_implementation = attention
    return cfg


def build_model(config, seed: int = 0, auto_class: str = "AutoModel"):
    """Random weights (seed) for ``config`` under ``auto_class`` (AutoModel: the base encoder; a head's
    Auto class, e.g. AutoModelForSequenceClassification, keeps the head)."""
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    model = getattr(tf, auto_class).from_config(config, attn_implementation=config._attn_implementation)
    # Fresh configs start with zero biases and unit LayerNorm scales; perturb every parameter so that a
    # fusion that drops or swaps a bias, a scale or a weight cannot pass parity by accident.
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    return model


def export_encoder(model, path: Path, exporter: str = "dynamo", opset: int = 18,
                   token_type_ids: bool = True, external_data: bool = False, head: Head | None = None) -> Path:
    """Export an encoder (BERT-like) with inputs input_ids, attention_mask[, token_type_ids] and the outputs of
    ``head`` (default: the base model's last_hidden_state)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    uses_tt = token_type_ids and model.config.model_type not in ("distilbert",)
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if uses_tt else [])
    batch, seq = 2, 8
    ids = torch.randint(0, min(model.config.vocab_size, 50), (batch, seq)) + 3
    args = [ids, torch.ones(batch, seq, dtype=torch.int64)]
    if uses_tt:
        args.append(torch.zeros(batch, seq, dtype=torch.int64))

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *inputs):
            out = self.inner(**dict(zip(names, inputs)))
            values = tuple(getattr(out, name) for name in head.outputs)
            return values[0] if len(values) == 1 else values

    head = head or HEADS[0]
    output_axes = {name: dict(enumerate(axes)) for name, axes in zip(head.outputs, head.axes)}
    wrapped = Wrapper(model).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            torch.onnx.export(wrapped, tuple(args), str(path), input_names=names,
                              output_names=list(head.outputs), opset_version=opset, dynamo=False,
                              dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names} | output_axes)
        elif exporter == "dynamo":
            b = torch.export.Dim("batch", min=1, max=1024)
            s = torch.export.Dim("sequence", min=1, max=model.config.max_position_embeddings - 4)
            prog = torch.onnx.export(wrapped, tuple(args), input_names=names,
                                     output_names=list(head.outputs), opset_version=opset, dynamo=True,
                                     dynamic_shapes=(tuple({0: b, 1: s} for _ in names),), verbose=False)
            prog.save(str(path), external_data=external_data)
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
    return path


def export_spec(spec: ExportSpec, path: Path) -> Path:
    model = build_model(tiny_config(spec.family, spec.attention))
    return export_encoder(model, path, spec.exporter, spec.opset, spec.token_type_ids)


# --- GPT-2 (causal LM) --------------------------------------------------------------------------------

GPT2_TINY = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=99, n_positions=128)


def tiny_gpt2_config(attention: str = "sdpa", **overrides):
    import transformers as tf

    cfg = tf.GPT2Config(**{**GPT2_TINY, **overrides})
    cfg._attn_implementation = attention
    return cfg


def build_gpt2(config, lm_head: bool = True, seed: int = 0):
    import torch
    import transformers as tf

    torch.manual_seed(seed)
    cls = tf.GPT2LMHeadModel if lm_head else tf.GPT2Model
    model = cls(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.eval()
    return model


def gpt2_io_names(n_layer: int, with_past: bool, lm_head: bool = True) -> tuple[list[str], list[str]]:
    inputs = ["input_ids", "position_ids", "attention_mask"]
    outputs = ["logits" if lm_head else "last_hidden_state"]
    if with_past:
        inputs += [f"past_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
        outputs += [f"present_{kind}_{i}" for i in range(n_layer) for kind in ("key", "value")]
    return inputs, outputs


class _GPT2Wrapper:
    """Flat tensors in and out: transformers 5 passes past state as a Cache object, ONNX wants tensors."""

    @staticmethod
    def make(model, with_past: bool):
        import torch
        from transformers import DynamicCache

        n_layer = model.config.n_layer
        lm_head = hasattr(model, "lm_head")

        class Wrapper(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.inner = model

            def forward(self, input_ids, position_ids, attention_mask, *past):
                cache = None
                if with_past:
                    cache = DynamicCache([(past[2 * i], past[2 * i + 1]) for i in range(n_layer)],
                                         config=model.config)
                out = self.inner(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                                 past_key_values=cache, use_cache=with_past)
                first = out.logits if lm_head else out.last_hidden_state
                if not with_past:
                    return first
                presents = []
                for layer in out.past_key_values.layers:
                    presents += [layer.keys, layer.values]
                return (first, *presents)

        return Wrapper().eval()


def export_gpt2(model, path: Path, exporter: str = "dynamo", opset: int = 18, with_past: bool = False,
                external_data: bool = False) -> Path:
    """Export GPT2Model / GPT2LMHeadModel. Inputs input_ids, position_ids, attention_mask (past + current)
    [, past_key_i, past_value_i]; outputs logits (or last_hidden_state) [, present_key_i, present_value_i];
    dynamic batch, sequence and past axes."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    lm_head = hasattr(model, "lm_head")
    names, outs = gpt2_io_names(cfg.n_layer, with_past, lm_head)
    batch, seq, past_len = 2, 3, 4 if with_past else 0
    head = cfg.n_embd // cfg.n_head
    args = [torch.randint(0, cfg.vocab_size, (batch, seq)),
            torch.arange(past_len, past_len + seq).repeat(batch, 1),
            torch.ones(batch, past_len + seq, dtype=torch.int64)]
    if with_past:
        args += [torch.randn(batch, cfg.n_head, past_len, head) for _ in range(2 * cfg.n_layer)]
    wrapped = _GPT2Wrapper.make(model, with_past)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            axes = {"input_ids": {0: "batch", 1: "sequence"}, "position_ids": {0: "batch", 1: "sequence"},
                    "attention_mask": {0: "batch", 1: "total_sequence"}}
            axes[outs[0]] = {0: "batch", 1: "sequence"}
            for n in names[3:]:
                axes[n] = {0: "batch", 2: "past_sequence"}
            for n in outs[1:]:
                axes[n] = {0: "batch", 2: "total_sequence"}
            torch.onnx.export(wrapped, tuple(args), str(path), input_names=names, output_names=outs,
                              opset_version=opset, dynamo=False, dynamic_axes=axes)
        elif exporter == "dynamo":
            auto = torch.export.Dim.AUTO   # let torch.export relate mask length = past + sequence itself
            shapes = [{0: auto, 1: auto}, {0: auto, 1: auto}, {0: auto, 1: auto}]
            past_shapes = tuple({0: auto, 2: auto} for _ in range(2 * cfg.n_layer)) if with_past else ()
            prog = torch.onnx.export(wrapped, tuple(args), input_names=names, output_names=outs,
                                     opset_version=opset, dynamo=True,
                                     dynamic_shapes=(*shapes, past_shapes) if with_past else tuple(shapes),
                                     verbose=False)
            prog.save(str(path), external_data=external_data)
        else:
            raise ValueError(f"unknown exporter {exporter!r}")
    return path


# --- `mlstep export`: a local transformers folder or a config JSON -> one .onnx file ------------------

EXPORT_FAMILIES = ENCODER_FAMILIES + ("gpt2",)
DEFAULT_OPSET = {"dynamo": 18, "torchscript": 17}
_OPSETS = {"dynamo": range(18, 24), "torchscript": range(14, 21)}
_EXTERNAL_DATA_BYTES = 1 << 30      # weights above this are written beside the model (protobuf caps at 2 GiB)


@dataclass(frozen=True)
class ExportResult:
    path: Path
    family: str
    architecture: str               # the transformers class exported
    random_weights: bool            # True for a config JSON source
    inputs: list[tuple[str, list]]  # (name, dims) of the graph inputs, dims readable
    outputs: list[tuple[str, list]]
    external_data: bool


def read_source_config(source: str | Path):
    """(transformers config, model folder or None) for a model folder or a config JSON; BadInputError else."""
    import json

    from mlstep.errors import BadInputError

    path = Path(source)
    if not path.exists():
        raise BadInputError(f"{source}: no such file or folder (expected a transformers model folder or a "
                            f"config JSON)")
    folder = path if path.is_dir() else None
    config_file = path / "config.json" if folder else path
    if folder and not config_file.is_file():
        raise BadInputError(f"{source}: not a transformers model folder (no config.json)")
    try:
        data = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise BadInputError(f"{config_file}: unreadable config ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if not isinstance(data, dict):
        raise BadInputError(f"{config_file}: unreadable config (a JSON object expected)")
    model_type = data.get("model_type")
    if model_type not in EXPORT_FAMILIES:
        arch = ",".join(data.get("architectures") or []) if isinstance(data.get("architectures"), list) else ""
        what = f"model_type {model_type!r}" + (f" ({arch})" if arch else "") if model_type else "no model_type"
        raise BadInputError(f"{config_file}: unsupported architecture: {what}; mlstep export handles "
                            f"{', '.join(EXPORT_FAMILIES)}")
    import transformers as tf

    try:
        config = tf.CONFIG_MAPPING[model_type].from_dict(data)
    except Exception as err:  # noqa: BLE001 - transformers' validation errors vary by version
        raise BadInputError(f"{config_file}: unreadable {model_type} config ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''})") from None
    return config, folder


def readable_dims(model, with_past: bool) -> None:
    """Rename the symbolic dims of graph inputs/outputs by role: batch, sequence, past_sequence,
    total_sequence (dynamo's Dim.AUTO names them s10, s70, 's15 + s70'). Static dims are kept; other symbolic
    dims get the readable name of the same symbol elsewhere on the graph's inputs/outputs, and inner value
    shapes are renamed with the same map. In place."""
    import onnx_ir as ir

    def roles(name: str) -> dict[int, str]:
        if name.startswith("past_"):
            return {0: "batch", 2: "past_sequence"}
        if name.startswith("present_"):
            return {0: "batch", 2: "total_sequence"}
        if "mask" in name:
            return {0: "batch", 1: "total_sequence" if with_past else "sequence"}
        return {0: "batch", 1: "sequence"}   # input_ids, token_type_ids, position_ids, logits, hidden states

    values = list(model.graph.inputs) + list(model.graph.outputs)
    renamed: dict[str, str] = {}
    for value in values:
        if value.shape is None:
            continue
        for axis, role in roles(value.name).items():
            if axis < len(value.shape) and not isinstance(value.shape[axis], int):
                old = value.shape[axis].value
                if old is not None:
                    renamed.setdefault(old, role)
    for value in values:
        if value.shape is None:
            continue
        role = roles(value.name)
        dims = []
        for axis, dim in enumerate(value.shape):
            if isinstance(dim, int):
                dims.append(dim)
            else:
                dims.append(role.get(axis) or renamed.get(dim.value, dim.value))
        value.shape = ir.Shape(dims)
    # Inner shapes use the same symbols: rename them too, so that shapes stay comparable across the graph
    # (an exporter's two names for one size, e.g. the mask's batch and the ids' batch, become one).
    for node in model.graph:
        for value in node.outputs:
            if value.shape is None or value.is_graph_output():
                continue
            value.shape = ir.Shape([d if isinstance(d, int) else renamed.get(d.value, d.value)
                                    for d in value.shape])


def export_model(source: str | Path, output: str | Path, exporter: str = "dynamo", opset: int | None = None,
                 attention: str = "sdpa", with_past: bool = False, lm_head: bool = True,
                 external_data: bool | None = None) -> ExportResult:
    """Export a local transformers model folder (its weights) or a config JSON (random weights, seed 0) of
    the families bert, distilbert, roberta, albert and gpt2, keeping the head that config.json's
    ``architectures`` names (see ``HEADS``: base model, sequence / token classification, question answering,
    masked LM; gpt2: GPT2LMHeadModel, or GPT2Model, also with ``lm_head=False``; ``with_past`` adds
    past/present tensors). Any other architecture is refused (BadInputError), nothing written.
    ``external_data`` None: weights go beside the model when they exceed 1 GiB."""
    import tempfile

    import onnx_ir as ir

    from mlstep.errors import BadInputError, OutputError, UsageError

    if exporter not in DEFAULT_OPSET:
        raise UsageError(f"unknown exporter {exporter!r} (choose from dynamo, torchscript)")
    opset = DEFAULT_OPSET[exporter] if opset is None else opset
    if opset not in _OPSETS[exporter]:
        r = _OPSETS[exporter]
        raise UsageError(f"opset {opset} is not supported by the {exporter} exporter (use {r.start}..{r.stop - 1})")
    if attention not in ("sdpa", "eager"):
        raise UsageError(f"unknown attention {attention!r} (choose from sdpa, eager)")
    output = Path(output)
    if output.is_dir():
        raise OutputError(f"{output}: is a folder; --output names the .onnx file to write")
    config, folder = read_source_config(source)
    family = config.model_type
    if family != "gpt2" and (with_past or not lm_head):
        raise UsageError(f"--with-past and --no-lm-head apply to gpt2 only, not {family}")
    head = _head_or_refuse(source, config)
    if family == "gpt2" and head == "GPT2Model":
        lm_head = False
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{output.parent}: cannot create the output folder ({err.strerror or err})") from None

    import transformers as tf

    config._attn_implementation = attention
    if family == "gpt2":
        cls = tf.GPT2LMHeadModel if lm_head else tf.GPT2Model
    else:
        cls = getattr(tf, head.auto_class)
    if folder is None:
        model = build_gpt2(config, lm_head=lm_head) if family == "gpt2" else build_model(config, 0, head.auto_class)
    else:
        try:
            model = cls.from_pretrained(folder, config=config, attn_implementation=attention).eval()
        except (OSError, ValueError) as err:
            raise BadInputError(f"{folder}: cannot load the model's weights ({str(err).splitlines()[0]})") \
                from None
    architecture = type(model).__name__
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    external = params > _EXTERNAL_DATA_BYTES if external_data is None else external_data

    with tempfile.TemporaryDirectory(prefix=f".{output.name}.export-", dir=output.parent) as tmp:
        raw = Path(tmp) / "model.onnx"
        if family == "gpt2":
            export_gpt2(model, raw, exporter, opset, with_past=with_past, external_data=exporter == "dynamo")
        else:
            export_encoder(model, raw, exporter, opset, external_data=exporter == "dynamo", head=head)
        onnx_model = ir.load(raw)
        readable_dims(onnx_model, with_past)
        for stale in (output, output.with_name(output.name + ".data")):
            stale.unlink(missing_ok=True)
        if not external:   # the exporter's external tensors go inline
            onnx_model = ir.external_data.load_to_model(onnx_model)
        ir.save(onnx_model, output, external_data=f"{output.name}.data" if external else None)
        del onnx_model

    def dims(value):
        return [d if isinstance(d, int) else d.value for d in value.shape] if value.shape is not None else []

    saved = ir.load(output)
    return ExportResult(output, family, architecture, folder is None,
                        [(v.name, dims(v)) for v in saved.graph.inputs],
                        [(v.name, dims(v)) for v in saved.graph.outputs], external)



def _head_or_refuse(source, config):
    """The encoder :class:`Head` (or, for gpt2, the architecture name) that ``config.architectures`` names."""
    from transformers.models.auto import modeling_auto

    from mlstep.errors import BadInputError

    architectures = [a for a in (getattr(config, "architectures", None) or []) if a]
    architecture = architectures[0] if architectures else None
    family = config.model_type
    if family == "gpt2":
        if architecture in (None, *GPT2_ARCHITECTURES):
            return architecture or GPT2_ARCHITECTURES[0]
        kept = ", ".join(GPT2_ARCHITECTURES)
    else:
        head = head_for(family, architecture)
        if head is not None:
            return head
        kept = ", ".join(getattr(modeling_auto, h.mapping)[family] for h in HEADS)
    raise BadInputError(f"{source}: architecture {architecture} is not exported; for {family} mlstep export keeps "
                        f"{kept}")
