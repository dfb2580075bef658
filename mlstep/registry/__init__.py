"""MLflow: the only package that imports mlflow (lazily: a local ``mlstep optimize model.onnx`` never loads it).

``sources``  resolve a source (file, folder, ``runs:/``, ``models:/``) to a concrete, hashed, local model
``store``    where the store is, the retry policy, MLflow's failures turned into one-line mlstep errors
``publish``  the step's run and exactly one registered version per (key, variant); returns what it did
``promote``  move an alias on evidence (the version's own run and report), not on a tag
``benchmark`` ``mlstep benchmark``'s run: the grid's params, metrics and files, the source as its input
"""
from __future__ import annotations

from mlstep.registry.benchmark import LoggedBenchmark, log_benchmark
from mlstep.registry.promote import Promotion, check_request
from mlstep.registry.promote import promote as _promote
from mlstep.registry.publish import (DEFAULT_ALIASES, DEFAULT_EXPERIMENT, TAG_GATES, TAG_KEY, TAG_OPTIONS_HASH,
                                     TAG_SHA256, TAG_SOURCE_SHA256, Publication, PublishRequest, Registration,
                                     VariantToPublish, ci_tags, description, finish, idempotency_key, input_example,
                                     metric_values, model_digest, params_of, publish, record, request_from_report,
                                     source_tags, variant_metrics)
from mlstep.registry.sources import (MLFLOW_SCHEMES, TAG_MLSTEP_RUN, TAG_SOURCE, TAG_VARIANT, Resolved, check_alias,
                                     check_name, is_mlflow_uri, materialize, model_id_of_version, onnx_in_model_dir,
                                     parse_uri, resolve_local, source_digest)
from mlstep.registry.store import Store, retry_policy, tracking_uri

Registry = Store            # the name the step used before the split


def promote(uri: str, alias: str, store: Store | None = None) -> Promotion:
    """``mlstep promote``: see :mod:`mlstep.registry.promote`."""
    check_request(uri, alias)           # a bad request fails before any store is opened (or created)
    return _promote(store or Store(reading=uri), uri, alias)


__all__ = ["DEFAULT_ALIASES", "DEFAULT_EXPERIMENT", "LoggedBenchmark", "MLFLOW_SCHEMES", "Promotion", "Publication",
           "PublishRequest", "Registration", "Registry", "Resolved", "Store", "TAG_GATES", "TAG_KEY",
           "TAG_MLSTEP_RUN", "TAG_OPTIONS_HASH", "TAG_SHA256", "TAG_SOURCE", "TAG_SOURCE_SHA256", "TAG_VARIANT",
           "VariantToPublish", "check_alias", "check_name", "ci_tags", "description", "finish", "idempotency_key",
           "input_example", "is_mlflow_uri", "log_benchmark", "materialize", "metric_values", "model_digest",
           "model_id_of_version", "onnx_in_model_dir", "params_of", "promote", "publish", "record",
           "request_from_report", "resolve_local", "retry_policy", "source_digest", "source_tags", "tracking_uri",
           "variant_metrics"]
