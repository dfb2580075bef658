"""``mlstep benchmark`` in MLflow: one run holding the grid (params, metrics, files), the source as its input.

::

    logged = log_benchmark(source=resolved, params={...}, metrics={...}, artifacts=[Path, ...], tags={...})
    logged.run_id, logged.experiment_id, logged.tracking_uri

``source`` is a :class:`~mlstep.registry.sources.Resolved` (an MLflow source: its LoggedModel becomes the
run's input, as for the optimize step) or the source's text (a local file logged with ``--log-to-mlflow``).
The run is tagged ``mlstep.kind=benchmark``, ``mlstep.source``, ``mlstep.version`` and the same
``mlflow.source.*`` / ``github.*`` tags as the optimize step's run. A store that fails part-way ends the run
FAILED (when it still answers) and raises ``RegistryError`` (exit 2); nothing is half-logged as FINISHED.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from mlstep import __version__
from mlstep.errors import MlstepError
from mlstep.redact import scrub
from mlstep.registry.publish import ci_tags, source_tags
from mlstep.registry.sources import TAG_MLSTEP_RUN, TAG_SOURCE, Resolved
from mlstep.registry.store import Store, is_unreachable

TAG_KIND = "mlstep.kind"


@dataclass(frozen=True)
class LoggedBenchmark:
    run_id: str
    experiment_id: str
    tracking_uri: str               # credentials removed

    def __str__(self) -> str:
        return f"run {self.run_id} (experiment {self.experiment_id}) at {self.tracking_uri}"


def log_benchmark(source: Resolved | str, params: Mapping[str, str], metrics: Mapping[str, float],
                  artifacts: Sequence[Path] = (), tags: Mapping[str, str] | None = None, *,
                  store: Store | None = None, experiment: str | None = None) -> LoggedBenchmark:
    """Log one benchmark run; see the module docstring."""
    from mlflow.entities import LoggedModelInput, Metric, Param

    from mlstep.registry.publish import _experiment

    store = store or Store()
    resolved = source if isinstance(source, Resolved) else None
    uri = resolved.uri if resolved else scrub(str(source))
    run_tags = {TAG_KIND: "benchmark", TAG_SOURCE: uri, TAG_MLSTEP_RUN: __version__, **source_tags(), **ci_tags(),
                **(tags or {})}
    if resolved is not None:
        run_tags["mlstep.source_requested"] = resolved.requested
        if resolved.sha256:
            run_tags["mlstep.source_sha256"] = resolved.sha256
    label = (resolved.name if resolved and resolved.name else Path(uri.split("#", 1)[0]).stem) or "model"
    client = store.client
    experiment_id = _experiment(store, experiment)     # default: MLFLOW_EXPERIMENT_NAME, else "mlstep"
    run = store.call("start run", client.create_run, experiment_id, run_name=scrub(f"mlstep-benchmark-{label}")[:250],
                     tags={k: scrub(str(v))[:5000] for k, v in run_tags.items()})
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        store.call("log params", client.log_batch, run_id,
                   params=[Param(k, scrub(str(v))[:6000]) for k, v in sorted(params.items())])
        items = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
        for start in range(0, len(items), 1000):           # MLflow's per-request metric limit
            store.call("log metrics", client.log_batch, run_id, metrics=items[start:start + 1000])
        if resolved is not None and resolved.model_id:
            store.call("log the source as the run's input", client.log_inputs, run_id,
                       models=[LoggedModelInput(resolved.model_id)])
        for path in artifacts:
            store.call(f"log {Path(path).name}", client.log_artifact, run_id, str(path))
        store.call("end run", client.set_terminated, run_id, "FINISHED")
    except MlstepError as err:
        if not is_unreachable(err):
            with contextlib.suppress(MlstepError):
                store.call("end run", client.set_terminated, run_id, "FAILED")
        raise
    except BaseException:          # a bug or a signal: the run still ends FAILED, then it propagates
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "FAILED")
        raise
    return LoggedBenchmark(run_id, experiment_id, store.shown)
