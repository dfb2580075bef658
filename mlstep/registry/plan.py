"""``mlstep plan``: which registered model versions still need an mlstep run, as a GitHub Actions matrix.

The registry is the only shared state between runners: a version is *done* when some registered version
carries ``mlstep.source = models:/NAME/VERSION`` and ``mlstep.gates = passed`` (what ``publish`` tags on every
variant it registers, whatever model it was registered under). The plan lists every version that an alias
points at (one per registered model), that passes the name filters, that is not itself an mlstep variant,
and that is not done:

    {"include": [{"model": NAME, "version": "3", "alias": "candidate", "model-uri": "models:/NAME/3"}, ...]}

Every version looked at gets a line saying why it is in or out (``Plan.lines``): nothing is dropped silently.
Planning is stateless and repeatable: two runners that plan at once plan the same thing, and the step's own
idempotency key makes a second optimize of one version a no-op.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from mlstep.errors import UsageError
from mlstep.registry.publish import TAG_GATES
from mlstep.registry.sources import TAG_SOURCE, TAG_VARIANT, check_alias, check_name
from mlstep.registry.store import Store, filter_string

MAX_JOBS = 256          # GitHub Actions' limit on the jobs one matrix may generate


@dataclass
class Plan:
    alias: str
    include: list[dict[str, str]] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)      # one per registered model looked at

    def matrix(self) -> dict:
        return {"include": self.include}


def plan(store: Store, alias: str, model_filter: str | None = None, models: Sequence[str] = (),
         limit: int = MAX_JOBS) -> Plan:
    """The versions ``alias`` points at that have no passing mlstep variant yet (see the module docstring).

    ``model_filter`` is a glob on the registered model name; ``models`` names models exactly (a dispatched
    event's model). Versions beyond ``limit`` are left for the next plan (and said so)."""
    check_alias(alias)
    if not 1 <= limit <= MAX_JOBS:
        raise UsageError(f"--max {limit}: 1 to {MAX_JOBS} (GitHub's matrix limit)")
    for name in models:
        check_name(name)
    result = Plan(alias)
    for name, aliases in _registered(store, models):
        if model_filter and not fnmatch.fnmatchcase(name, model_filter):
            continue                                          # outside the filter: not looked at
        version = aliases.get(alias)
        if version is None:
            result.lines.append(f"{name}: no @{alias}: skipped")
            continue
        uri = f"models:/{name}/{version}"
        mv = store.call(f"{uri}: read", store.client.get_model_version, name, str(version))
        if (mv.tags or {}).get(TAG_VARIANT):
            result.lines.append(f"{uri} (@{alias}): an mlstep {mv.tags[TAG_VARIANT]} variant itself: skipped")
            continue
        done = _passing_variants(store, uri)
        if done:
            result.lines.append(f"{uri} (@{alias}): done ({', '.join(done)})")
            continue
        if len(result.include) >= limit:
            result.lines.append(f"{uri} (@{alias}): to optimize, but over --max {limit}: left for the next plan")
            continue
        result.include.append({"model": name, "version": str(version), "alias": alias, "model-uri": uri})
        result.lines.append(f"{uri} (@{alias}): no passing mlstep variant: planned")
    return result


def _registered(store: Store, models: Sequence[str]):
    """(name, {alias: version}) of the named models, else of every registered model (all pages)."""
    client = store.client
    if models:
        for name in dict.fromkeys(models):
            rm = store.call(f"models:/{name}", client.get_registered_model, name)
            yield rm.name, dict(rm.aliases or {})
        return
    token = None
    while True:
        page = store.call("search registered models", client.search_registered_models, max_results=1000,
                          page_token=token)
        for rm in page:
            yield rm.name, dict(rm.aliases or {})
        token = page.token
        if not token:
            return


def _passing_variants(store: Store, uri: str) -> list[str]:
    """``models:/NAME/V`` of each registered version made from ``uri`` whose gates passed."""
    query = filter_string(tags={TAG_SOURCE: uri, TAG_GATES: "passed"})
    found = store.call(f"{uri}: search variants", store.client.search_model_versions, query)
    return sorted(f"{v.tags.get(TAG_VARIANT, '?')} models:/{v.name}/{v.version}" for v in found
                  if str(getattr(v, "status", "READY")) != "FAILED_REGISTRATION")
