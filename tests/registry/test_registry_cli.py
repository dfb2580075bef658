"""``mlstep optimize`` as users run it (a subprocess) against a real ``mlflow server`` behind the fault proxy:
a store that dies half-way, and bad store settings. Waits are on events (a request seen), never on time."""
from __future__ import annotations

import json
import socket
import threading

import pytest
from mlflow import MlflowClient

from faultproxy import FaultProxy
from test_registry import QUICK, mlstep, one_line_error, register_source, versions

CREATE = "/model-versions/create"


@pytest.fixture(scope="module")
def tiny_bert(exported):
    from mlstep.export import ExportSpec

    return exported(ExportSpec("bert"))


def wait_for(event: threading.Event, proc) -> bool:
    """Wait until ``event`` is set or ``proc`` ended (whichever comes first); True when the event came."""
    while not event.wait(0.5):
        if proc.poll() is not None:
            return event.is_set()
    return True


def test_a_server_that_dies_half_way_and_the_rerun_that_completes(start_mlflow_server, tiny_bert, tmp_path):
    """The proxy holds the fp16 create-model-version request; the server is killed while it is held (so the
    fp32 version exists, the fp16 one cannot): exit 2 in one line, outputs and report kept and saying what
    exists. After a restart, the re-run ends the dead step's run FAILED and registers fp16 only."""
    import signal

    root = tmp_path / "server"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with start_mlflow_server(root, port, signal.SIGKILL) as (uri, stop), FaultProxy(uri) as proxy:
        register_source(uri, tiny_bert, "cut")
        held = proxy.add("POST", CREATE, "hold", first=2)          # the second create is fp16's
        proc = mlstep("optimize", "models:/cut@candidate", "-o", tmp_path / "out", *QUICK, tracking=proxy.uri,
                      wait=False)
        arrived = wait_for(proxy.seen("POST", CREATE, 2), proc)
        assert arrived, proc.communicate()
        stop()                                                    # SIGKILL: the server is gone
        held.release.set()
        stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2, (stderr, stdout)
    assert len(stderr.splitlines()) == 1 and "did not answer" in stderr and "Traceback" not in stderr, stderr
    assert "registered so far: fp32 models:/cut/2" in stderr and "re-run" in stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["variants"]["fp32"]["registered"] == "models:/cut/2"
    assert report["variants"]["fp16"]["registered"] is None
    assert report["mlflow"]["registrations"]["fp16"]["status"] == "failed" and report["mlflow"]["error"]
    assert report["mlflow"]["run_status"] == "RUNNING"           # said plainly: the store could not be told
    assert (tmp_path / "out" / "fp16" / "model.onnx").is_file()
    first_run = report["mlflow"]["run_id"]

    with start_mlflow_server(root, port) as (uri, stop):
        client = MlflowClient(uri, uri)
        again = mlstep("optimize", "models:/cut@candidate", "-o", tmp_path / "again", *QUICK, tracking=uri)
        assert again.returncode == 0, again.stderr + again.stdout
        regs = json.loads((tmp_path / "again" / "report.json").read_text())["mlflow"]["registrations"]
        assert (regs["fp32"]["status"], regs["fp32"]["uri"]) == ("existing", "models:/cut/2")
        assert regs["fp16"]["status"] == "registered"
        found = versions(client, "cut")
        assert sorted(v.tags.get("mlstep.variant", "source") for v in found.values()) == ["fp16", "fp32", "source"]
        assert client.get_model_version_by_alias("cut", "optimized-fp32").version == "2"
        assert client.get_model_version_by_alias("cut", "optimized-fp16").version == regs["fp16"]["uri"].split("/")[-1]
        assert client.get_run(first_run).info.status == "FAILED"
        exp = client.get_experiment_by_name("mlstep")
        assert client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'") == []
        assert [m for m in client.search_logged_models([exp.experiment_id]) if str(m.status).endswith("PENDING")] == []
        # The dead step's fp32 version gets its evidence from the re-run: promote accepts it.
        promoted = mlstep("promote", "models:/cut/2", "--alias", "champion", tracking=uri)
        assert promoted.returncode == 0, promoted.stderr
        stop()


@pytest.mark.parametrize("tracking", ["http//127.0.0.1:5000", "ftp://host/x", "http://[::1", "http://host:port",
                                      "http://", "http://alice:s3@cr3t@host:99999"])
def test_a_malformed_tracking_uri_is_one_line(tracking, tmp_path):
    proc = mlstep("optimize", "models:/x/1", "-o", tmp_path / "o", tracking=tracking, cwd=tmp_path)
    line = one_line_error(proc)
    assert "MLFLOW_TRACKING_URI" in line and "s3@cr3t" not in line and "cr3t" not in line, line
    promote = mlstep("promote", "models:/x/1", "--alias", "a", tracking=tracking, cwd=tmp_path)
    assert "MLFLOW_TRACKING_URI" in one_line_error(promote)
    assert not (tmp_path / "o").exists() and not (tmp_path / "mlflow.db").exists()


def test_names_over_255_bytes_are_one_line(tmp_path):
    long = "m" * 200 + "é" * 30                                  # 260 bytes, 230 characters
    for args in (["optimize", f"models:/{long}/1", "-o", tmp_path / "o"],
                 ["optimize", f"models:/{long}@candidate", "-o", tmp_path / "o"],
                 ["promote", f"models:/{long}/1", "--alias", "champion"]):
        line = one_line_error(mlstep(*args, cwd=tmp_path))
        assert "260 bytes" in line and "255" in line, line
    source = tmp_path / "m.onnx"
    from registry_helpers import tiny_model

    tiny_model(source, 0)
    line = one_line_error(mlstep("optimize", source, "-o", tmp_path / "o", "--register-as", long, cwd=tmp_path))
    assert "260 bytes" in line
    assert not (tmp_path / "o").exists() and not (tmp_path / "mlflow.db").exists()
