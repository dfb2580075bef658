"""``mlstep benchmark``: the grid (real ORT sessions on a tiny BERT export), its files, torch eager, the CLI."""
from __future__ import annotations

import csv
import json

import onnx
import pytest
from onnx import TensorProto, helper

from mlstep.bench.grid import ORT_MLSTEP, ORT_SOURCE, TORCH_EAGER, GridSettings, run_grid
from mlstep.errors import UsageError
from mlstep.export import ExportSpec, tiny_config
from test_cli import mlstep

FAST = dict(warmup=1, repeat=3)
PNG = b"\x89PNG\r\n\x1a\n"


def test_grid_on_bert_has_the_seed_shape_and_writes_every_file(exported, tmp_path):
    seen = []
    result = run_grid(exported(ExportSpec("bert")), GridSettings(batch_sizes=(1, 2), sequence_lengths=(4, 8), **FAST),
                      progress=lambda done, total, what: seen.append((done, total)))
    header, rows = result.table()
    assert header == ["engine", "precision", "batch", "s=4", "s=8"]
    assert [r[:3] for r in rows] == [[ORT_SOURCE, "fp32", "1"], [ORT_SOURCE, "fp32", "2"],
                                     [ORT_MLSTEP, "fp32", "1"], [ORT_MLSTEP, "fp32", "2"],
                                     [ORT_MLSTEP, "fp16", "1"], [ORT_MLSTEP, "fp16", "2"]]
    assert all(float(v) > 0 for r in rows for v in r[3:])
    assert len(result.cells) == 12 and seen[-1] == (12, 12)
    assert all(c.provider == "CPUExecutionProvider" and c.threads >= 1 and not c.io_binding for c in result.cells)
    assert all(c.median_ms <= c.p90_ms <= c.p95_ms for c in result.cells)
    assert result.environment["ort_threads"] >= 1 and result.environment["onnxruntime"]

    files = result.write(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "benchmark.csv", "benchmark.json", "benchmark.md", "latency.png"]
    markdown = files["markdown"].read_text()
    assert "| engine | precision | batch | s=4 | s=8 |" in markdown and f"| {ORT_MLSTEP} | fp16 | 2 |" in markdown
    with files["csv"].open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 12 and {r["engine"] for r in table} == {ORT_SOURCE, ORT_MLSTEP}
    data = json.loads(files["json"].read_text())
    assert len(data["results"]) == 12 and data["settings"]["repeat"] == 3
    assert files["plot"].read_bytes().startswith(PNG)
    assert "latency_ms.onnxruntime_mlstep.fp16.b2.s8" in result.metrics()


def test_grid_with_torch_eager_from_a_config_file(exported, tmp_path):
    config = tmp_path / "config.json"
    tiny_config("bert").to_json_file(config)
    result = run_grid(exported(ExportSpec("bert")),
                      GridSettings(sequence_lengths=(8,), precisions=("fp32",), torch_model=str(config), **FAST))
    engines = [r[0] for r in result.table()[1]]
    assert engines == [ORT_SOURCE, ORT_MLSTEP, TORCH_EAGER]
    torch_cell = result.cells[-1]
    assert torch_cell.provider == "cpu" and torch_cell.median_ms > 0 and torch_cell.threads >= 1
    assert result.environment["torch_threads"] >= 1


def past_model(path):
    """A decoder-shaped signature (ids, mask over past + new, one past tensor): no fusions, valid for ORT."""
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("ReduceSum", ["past_key_values.0.key"], ["s"], keepdims=0),
         helper.make_node("Cast", ["input_ids"], ["ids"], to=f),
         helper.make_node("ReduceSum", ["ids"], ["t"], keepdims=0),
         helper.make_node("Add", ["s", "t"], ["y"])], "past",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"]),
         helper.make_tensor_value_info("past_key_values.0.key", f, ["batch", 2, "past_sequence", 4])],
        [helper.make_tensor_value_info("y", f, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_grid_with_past_times_one_new_token(tmp_path):
    source = past_model(tmp_path / "past.onnx")
    result = run_grid(source, GridSettings(sequence_lengths=(99,), past_sequence_lengths=(4, 16),
                                           precisions=("fp32",), **FAST))
    header, _ = result.table()
    assert header == ["engine", "precision", "batch", "past=4", "past=16"]
    assert {(c.sequence_length, c.past_sequence_length) for c in result.cells} == {(1, 4), (1, 16)}
    with pytest.raises(UsageError, match="past"):
        run_grid(source, GridSettings(torch_model=str(tmp_path), **FAST))


def test_cli_prints_the_table_and_writes_files(exported, tmp_path):
    out = tmp_path / "bench"
    proc = mlstep("benchmark", exported(ExportSpec("bert")), "-b", "1", "-s", "4,8", "--sequence-length", "12",
                  "--warmup", "1", "--repeat", "3", "-o", out)
    assert proc.returncode == 0, proc.stderr
    for needle in ("s=4", "s=8", "s=12", ORT_SOURCE, ORT_MLSTEP, "fp16", "median ms"):
        assert needle in proc.stdout, needle
    assert proc.stderr == ""                      # no terminal: no progress bar
    assert (out / "benchmark.md").is_file() and (out / "latency.png").is_file()


@pytest.mark.parametrize("args, needle", [
    (["-s", "4,x"], "--sequence-length"),
    (["-p", "int8"], "unknown precision"),
    (["--torch", "/nonexistent/folder"], "--torch"),
])
def test_cli_bad_usage_is_one_line(exported, tmp_path, args, needle):
    source = exported(ExportSpec("bert"))
    proc = mlstep("benchmark", source, "-s", "4", "--repeat", "1", *args)
    assert proc.returncode == 2, proc.stderr + proc.stdout
    assert len(proc.stderr.splitlines()) == 1 and needle in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
