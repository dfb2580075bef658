"""Library-level publishing for the registry tests: ``publish`` + ``finish`` of real variant files, the way
the step calls them, without the optimizer's minutes. Also runnable as a script (a step in another process):

    python registry_helpers.py TRACKING SOURCE NAME FP32.onnx FP16.onnx OUT.json
"""
from __future__ import annotations

import json
import zlib
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from mlstep import registry

OPTIONS_HASH = "0123456789abcdef"


def tiny_model(path: Path, seed: int) -> Path:
    """y = x @ W (W from ``seed``): a real, loadable ONNX model whose bytes depend on the seed."""
    weight = np.random.default_rng(seed).standard_normal((4, 4)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "tiny",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
                              [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def step_publish(store: registry.Store, source: str, name: str, variants: dict[str, Path],
                 passed: dict[str, bool] | None = None) -> registry.Publication:
    """Resolve ``source``, publish the variants, write the report (as the step renders it) and finish."""
    passed = passed or {}
    with registry.materialize(source, store, identify_local=True) as resolved:
        request = registry.PublishRequest(
            resolved=resolved, register_as=name, options_hash=OPTIONS_HASH,
            variants={v: registry.VariantToPublish(p, passed.get(v, True), f"{v} test variant")
                      for v, p in variants.items()},
            params={"options_hash": OPTIONS_HASH}, metrics={"optimizer_seconds": 0.5},
            aliases={v: f"optimized-{v}" for v in variants})
        pub = registry.publish(store, request)
        with tempfile.TemporaryDirectory() as tmp:
            report = {"source": resolved.requested,
                      "variants": {v: {"gate": {"passed": passed.get(v, True)},
                                       "registered": (pub.registrations.get(v) or registry.Registration(v, "")).uri}
                                   for v in variants},
                      "mlflow": registry.record(store, resolved, name, pub)}
            path = Path(tmp) / "report.json"
            path.write_text(json.dumps(report))
            return registry.finish(store, pub, [path], {}, all(passed.get(v, True) for v in variants))


# ------------------------------------------------------------ fixtures (imported by the registry test modules)

@pytest.fixture()
def proxy(mlflow_server):
    from faultproxy import FaultProxy

    with FaultProxy(mlflow_server) as p:
        yield p


@pytest.fixture()
def fast_retries(monkeypatch):
    """Few, quick retries: a dead store is reported in seconds (the retry is what duplicates a POST)."""
    from mlstep.registry import store

    store.configure()
    for var, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "0"),
                       ("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")):
        monkeypatch.setenv(var, value)
    return monkeypatch


@pytest.fixture()
def client(mlflow_server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)


@pytest.fixture()
def files(tmp_path) -> dict[str, Path]:
    """A source and two variant files (real ONNX models, distinct bytes), unique to the test."""
    seed = zlib.crc32(tmp_path.name.encode()) % 10_000
    return {"source": tiny_model(tmp_path / "src" / "model.onnx", seed),
            "fp32": tiny_model(tmp_path / "fp32" / "model.onnx", seed + 1),
            "fp16": tiny_model(tmp_path / "fp16" / "model.onnx", seed + 2)}


def as_dict(pub: registry.Publication) -> dict:
    return {"run_id": pub.run_id, "error": pub.error, "run_status": pub.run_status, "removed": pub.removed,
            "registrations": {v: {"status": r.status, "uri": r.uri} for v, r in pub.registrations.items()}}


if __name__ == "__main__":
    tracking, source, name, fp32, fp16, out = sys.argv[1:7]
    pub = step_publish(registry.Store(tracking), source, name, {"fp32": Path(fp32), "fp16": Path(fp16)})
    Path(out).write_text(json.dumps(as_dict(pub)))
