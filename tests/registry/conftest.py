"""Fixtures of the registry tests: a fault-injecting proxy in front of the session's real ``mlflow server``,
small retry budgets, and real variant files to publish."""
from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from faultproxy import FaultProxy  # noqa: E402
from registry_helpers import tiny_model  # noqa: E402


@pytest.fixture()
def proxy(mlflow_server):
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
    seed = abs(hash(tmp_path.name)) % 10_000
    return {"source": tiny_model(tmp_path / "src" / "model.onnx", seed),
            "fp32": tiny_model(tmp_path / "fp32" / "model.onnx", seed + 1),
            "fp16": tiny_model(tmp_path / "fp16" / "model.onnx", seed + 2)}
