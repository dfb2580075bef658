"""Shared fixtures: real exports made at test time from tiny transformers configs, cached per session."""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# Tests say themselves when a command runs under CI (mlstep then prints stage lines on stderr): the suite's own CI
# must not turn that on for every subprocess.
for _ci in ("CI", "GITHUB_ACTIONS"):
    os.environ.pop(_ci, None)

from mlstep.export import ExportSpec, export_spec  # noqa: E402

# The layout matrix every encoder fusion is tested on.
LAYOUTS = [("torchscript", 14), ("torchscript", 17), ("dynamo", 18)]
ATTENTIONS = ["eager", "sdpa"]


@pytest.fixture(scope="session")
def export_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("exports")


@pytest.fixture(scope="session")
def exported(export_dir):
    """exported(ExportSpec) -> path of the .onnx file (made once per session)."""
    cache: dict[str, Path] = {}

    def get(spec: ExportSpec) -> Path:
        if spec.key not in cache:
            cache[spec.key] = export_spec(spec, export_dir / f"{spec.key}.onnx")
        return cache[spec.key]

    return get


@contextlib.contextmanager
def running_mlflow_server(root: Path, port: int | None = None, kill_signal: int | None = None,
                          env: dict[str, str] | None = None):
    """Start a real ``mlflow server`` on 127.0.0.1 (sqlite backend ``root/mlflow.db``, proxied artifacts in
    ``root/artifacts``), wait for /health and yield ``(uri, stop)``; ``stop()`` (also called at the end)
    ends its process group with ``kill_signal`` (default SIGTERM). ``env``: more server environment."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    root.mkdir(parents=True, exist_ok=True)
    if port is None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    script = Path(sys.executable).parent / "mlflow"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "mlflow"]
    command += ["server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                "--artifacts-destination", str(root / "artifacts"), "--serve-artifacts"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")} | {"MLFLOW_DISABLE_TELEMETRY": "true"} \
        | (env or {})
    log = open(root / "server.log", "ab")
    proc = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600        # a hang guard: a server that exits is seen at once (poll)
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
            time.sleep(0.3)

        def stop():
            if proc.poll() is None:
                os.killpg(proc.pid, kill_signal or signal.SIGTERM)
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

        yield uri, stop
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real ``mlflow server`` on 127.0.0.1 for the session: a free port, a sqlite backend and proxied
    artifacts (``--serve-artifacts``) in a temp folder. Yields its URI; stopped at the end."""
    with running_mlflow_server(tmp_path_factory.mktemp("mlflow-server")) as (uri, stop):
        yield uri
        stop()


@pytest.fixture(scope="session")
def start_mlflow_server():
    """``start_mlflow_server(root, port=None, kill_signal=None)``: a context manager for a private server
    (see ``running_mlflow_server``), for tests that stop and restart one."""
    return running_mlflow_server


# --- GPT-2 -------------------------------------------------------------------------------------------

# The GPT-2 layouts: TorchScript at the low end of its opsets, dynamo at 18.
GPT2_LAYOUTS = [("torchscript", 14), ("dynamo", 18)]
# variant -> (n_layer, lm_head): GPT2LMHeadModel, GPT2Model and a DistilGPT2-shaped (6-layer) LM.
GPT2_VARIANTS = {"lm": (2, True), "model": (2, False), "distil": (6, True)}


@pytest.fixture(scope="session")
def exported_gpt2(export_dir):
    """exported_gpt2(variant, exporter, opset, attention, with_past) -> .onnx path (made once per session)."""
    from mlstep.export import build_gpt2, export_gpt2, tiny_gpt2_config

    cache: dict[tuple, Path] = {}

    def get(variant: str, exporter: str, opset: int, attention: str, with_past: bool) -> Path:
        key = (variant, exporter, opset, attention, with_past)
        if key not in cache:
            n_layer, lm_head = GPT2_VARIANTS[variant]
            model = build_gpt2(tiny_gpt2_config(attention, n_layer=n_layer), lm_head=lm_head)
            name = f"gpt2-{variant}-{exporter}{opset}-{attention}{'-past' if with_past else ''}.onnx"
            cache[key] = export_gpt2(model, export_dir / name, exporter, opset, with_past=with_past)
        return cache[key]

    return get


def cancellation_model(path: Path) -> Path:
    """y = LayerNorm((x + 1000) @ W - 1000 * colsum(W)): exact in fp32, ~0.6 off in fp16 (x + 1000 keeps 0.5
    steps), so the fp16 variant fails its parity gate. The LayerNorm arrives decomposed (ReduceMean, Pow,
    Sqrt, Div): a block the detector sees and fuses, so the coverage gate passes and only parity decides."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((4, 4)).astype(np.float32)
    inits = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(np.array([1000.0], np.float32), "c"),
             numpy_helper.from_array((1000.0 * weight.sum(0)).astype(np.float32), "d"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array([1e-5], np.float32), "eps"),
             numpy_helper.from_array(np.linspace(0.5, 1.5, 4).astype(np.float32), "gamma"),
             numpy_helper.from_array(np.linspace(-0.1, 0.1, 4).astype(np.float32), "beta")]
    nodes = [helper.make_node("Add", ["x", "c"], ["h"]), helper.make_node("MatMul", ["h", "W"], ["m"]),
             helper.make_node("Sub", ["m", "d"], ["z"]),
             helper.make_node("ReduceMean", ["z"], ["mean"], axes=[-1]), helper.make_node("Sub", ["z", "mean"], ["dev"]),
             helper.make_node("Pow", ["dev", "two"], ["sq"]), helper.make_node("ReduceMean", ["sq"], ["var"], axes=[-1]),
             helper.make_node("Add", ["var", "eps"], ["var_eps"]), helper.make_node("Sqrt", ["var_eps"], ["std"]),
             helper.make_node("Div", ["dev", "std"], ["normed"]), helper.make_node("Mul", ["normed", "gamma"], ["scaled"]),
             helper.make_node("Add", ["scaled", "beta"], ["y"])]
    graph = helper.make_graph(nodes, "cancel", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path
