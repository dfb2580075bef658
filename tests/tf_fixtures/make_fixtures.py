"""Make the TF BERT fixtures (tf2onnx ``from_function`` and ``from_keras``) committed beside this script.

Runs in its OWN pinned virtual environment, never the project's (the main test suite only reads the
committed .onnx files and never installs TensorFlow)::

    python3.11 -m venv /tmp/tfvenv
    /tmp/tfvenv/bin/pip install tensorflow-cpu==2.15.1 keras==2.15.0 transformers==4.46.3 \
        tf2onnx==1.16.1 onnx==1.16.2 'numpy<2'
    /tmp/tfvenv/bin/python tests/tf_fixtures/make_fixtures.py

Each fixture is a tiny TFBertModel (hidden 32, 2 layers, vocab 99) whose every weight, bias and LayerNorm
scale/shift is perturbed with random noise (a zero bias or a unit scale would let a wrong fusion pass
parity); the weights are the same on every run (seeded), the node order and constant names tf2onnx
writes may differ from run to run. Outputs: last_hidden_state and pooler_output. The script also checks
each export against TensorFlow itself on a left- and right-padded batch, and writes VERSIONS.txt.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf2onnx  # noqa: E402
import transformers  # noqa: E402
from transformers import BertConfig, TFBertModel  # noqa: E402
from transformers.modeling_tf_utils import keras  # noqa: E402 - the Keras transformers itself uses

HERE = Path(__file__).resolve().parent
VOCAB, HIDDEN, LAYERS, INTERMEDIATE, MAX_POS = 99, 32, 2, 37, 64

# name: (exporter, opset, heads, token_type_ids, index dtype)
FIXTURES = {
    "bert_tf_fn_op13_h4_tt_i32": ("function", 13, 4, True, tf.int32),
    "bert_tf_fn_op17_h2_nott_i32": ("function", 17, 2, False, tf.int32),
    "bert_tf_fn_op17_h4_tt_i64": ("function", 17, 4, True, tf.int64),
    "bert_keras_op13_h4_tt_i32": ("keras", 13, 4, True, tf.int32),
    "bert_keras_op17_h2_nott_i64": ("keras", 17, 2, False, tf.int64),
}


def tiny_bert(heads: int, seed: int) -> TFBertModel:
    keras.utils.set_random_seed(seed)           # python, numpy and TF seeds: the same weights on every run
    tf.config.experimental.enable_op_determinism()
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=heads,
                        intermediate_size=INTERMEDIATE, max_position_embeddings=MAX_POS, type_vocab_size=2,
                        hidden_act="gelu")
    model = TFBertModel(config)
    model(model.dummy_inputs, training=False)   # build the weights
    rng = np.random.default_rng(seed)
    for weight in model.weights:                # every weight, bias, LN gamma/beta: no zeros, no ones
        value = weight.numpy()
        weight.assign(value + rng.normal(0.0, 0.05, value.shape).astype(value.dtype))
    return model


def signature(with_tt: bool, dtype) -> list[tf.TensorSpec]:
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if with_tt else [])
    return [tf.TensorSpec([None, None], dtype, name=n) for n in names]


def export(name: str, exporter: str, opset: int, heads: int, with_tt: bool, dtype) -> Path:
    keras.backend.clear_session()               # stable layer names whatever was exported before
    model = tiny_bert(heads, seed=sum(map(ord, name)))
    spec = signature(with_tt, dtype)
    path = HERE / f"{name}.onnx"
    if exporter == "function":
        if with_tt:
            @tf.function(input_signature=spec)
            def fn(input_ids, attention_mask, token_type_ids):
                out = model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                            training=False)
                return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
        else:
            @tf.function(input_signature=spec)
            def fn(input_ids, attention_mask):
                out = model(input_ids=input_ids, attention_mask=attention_mask, training=False)
                return {"last_hidden_state": out.last_hidden_state, "pooler_output": out.pooler_output}
        tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset, output_path=str(path))
        runner = lambda feeds: [fn(**feeds)[k] for k in ("last_hidden_state", "pooler_output")]  # noqa: E731
    else:
        inputs = [keras.Input(shape=(None,), dtype=s.dtype, name=s.name) for s in spec]
        kwargs = dict(zip([s.name for s in spec], inputs))
        out = model(**kwargs, training=False)
        wrapped = keras.Model(inputs=inputs, outputs=[out.last_hidden_state, out.pooler_output])
        tf2onnx.convert.from_keras(wrapped, input_signature=spec, opset=opset, output_path=str(path))
        runner = lambda feeds: wrapped([feeds[s.name] for s in spec], training=False)  # noqa: E731
    check_against_tf(path, runner, spec)
    return path


def check_against_tf(path: Path, runner, spec) -> None:
    """ONNX (reference evaluator) vs TensorFlow on a left- and right-padded batch: the export is faithful."""
    import onnx
    from onnx.reference import ReferenceEvaluator

    mask = np.array([[1] * 7, [1] * 4 + [0] * 3, [0] * 2 + [1] * 5])
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, VOCAB, mask.shape), "attention_mask": mask,
             "token_type_ids": rng.integers(0, 2, mask.shape)}
    feeds = {s.name: feeds[s.name].astype(s.dtype.as_numpy_dtype) for s in spec}
    expected = [v.numpy() for v in runner({k: tf.constant(v) for k, v in feeds.items()})]
    model = onnx.load(str(path))
    got = ReferenceEvaluator(model).run(None, {i.name: feeds[i.name] for i in model.graph.input})
    for output, ref, value in zip(model.graph.output, expected, got):   # outputs in the order TF returns them
        diff = float(np.abs(value - ref).max())
        assert diff < 1e-4, f"{path.name}: {output.name} differs from TensorFlow by {diff}"


def main(argv: list[str]) -> int:
    only = set(argv)
    for name, args in FIXTURES.items():
        if only and name not in only:
            continue
        path = export(name, *args)
        print(f"{path.name}: {path.stat().st_size / 1024:.0f} KiB", flush=True)
    import onnx
    versions = {"python": sys.version.split()[0], "tensorflow": tf.__version__, "keras": keras.__version__,
                "transformers": transformers.__version__, "tf2onnx": tf2onnx.__version__,
                "onnx": onnx.__version__, "numpy": np.__version__}
    lines = ["# versions that made the .onnx fixtures here (tests/tf_fixtures/make_fixtures.py)"]
    lines += [f"{k}=={v}" for k, v in versions.items()]
    (HERE / "VERSIONS.txt").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
