"""Shared fixtures: real exports made at test time from tiny transformers configs, cached per session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

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
