"""Secrets out of every string that leaves the process (messages, tracebacks, report, params, tags, artifacts).

What counts as a secret:

- the user info of any URI: ``scheme://USER:PASSWORD@host`` -> ``scheme://***@host``. The user info runs to
  the *last* ``@`` of the authority (the part before the first ``/``, ``?``, ``#`` or blank), so a password
  holding a raw ``@``, ``:`` or ``%`` (``http://alice:x@Pw@host``) is removed whole;
- credential-looking query parameters (``?token=...``, ``&password=...``, ``sig``, ``secret``, ``key``...);
- the value of every secret environment variable in ``SECRET_ENV`` that is set, and the user info of
  ``MLFLOW_TRACKING_URI`` / ``MLFLOW_REGISTRY_URI`` (raw and percent-decoded), wherever they appear, even
  outside a URI (an error message that quotes a decoded password).

``scrub(text)`` for one string, ``scrub_all(obj)`` for nested JSON-like data, ``format_exception()`` for a
traceback fit to print.
"""
from __future__ import annotations

import base64
import os
import re
import traceback
from collections.abc import Mapping
from urllib.parse import quote, unquote

MASK = "***"
SECRET_ENV = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_PASSWORD", "DATABRICKS_TOKEN", "DATABRICKS_CLIENT_SECRET",
              "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AZURE_STORAGE_ACCESS_KEY", "GITHUB_TOKEN", "GH_TOKEN",
              "MLSTEP_GITHUB_TOKEN", "MLSTEP_WEBHOOK_SECRET")
URI_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
MIN_SECRET = 4                 # shorter values ("1", "abc") would mask ordinary words

# scheme://  then the authority's user info up to its last "@" (greedy; the authority ends at / ? # blank
# or a quote/bracket that closes the text around the URI).
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/?#\s'\"<>()\[\]]*@")
_QUERY_SECRET = re.compile(r"(?i)([?&;](?:[a-z0-9_.-]*(?:token|password|passwd|pwd|secret|sig|signature|"
                           r"api[_-]?key|access[_-]?key|credential)[a-z0-9_.-]*)=)[^&#\s'\"<>]+")


def secrets(env: Mapping[str, str] | None = None) -> list[str]:
    """The secret values set in ``env`` (default: this process's environment) in every spelling a message
    may carry (raw, percent-decoded, percent-encoded, and the Basic authorization header), longest first."""
    env = os.environ if env is None else env
    values = {env.get(name, "") for name in SECRET_ENV}
    found: set[str] = set()
    for name in URI_ENV:
        uri = env.get(name, "")
        match = re.match(r"[A-Za-z][A-Za-z0-9+.-]*://([^/?#\s]*)@", uri)
        if match:
            userinfo = match.group(1)
            user, _, password = unquote(userinfo).partition(":")
            values |= {userinfo, password, unquote(password)}
            basic = f"{unquote(user)}:{unquote(password)}".encode()
            found.add(base64.b64encode(basic).decode())
    for value in filter(None, values):
        found |= {value, unquote(value), quote(value, safe=""), quote(value, safe=":"), quote(unquote(value), safe=":")}
    return sorted((s for s in found if len(s) >= MIN_SECRET), key=len, reverse=True)


def scrub(text: str) -> str:
    """``text`` without credentials (see the module docstring)."""
    text = str(text)
    for secret in secrets():
        text = text.replace(secret, MASK)
    text = _USERINFO.sub(lambda m: m.group("scheme") + MASK + "@", text)
    return _QUERY_SECRET.sub(lambda m: m.group(1) + MASK, text)


def scrub_all(obj):
    """``scrub`` applied to every string (keys included) of nested mappings / lists."""
    if isinstance(obj, Mapping):
        return {scrub(str(k)): scrub_all(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [scrub_all(v) for v in obj]
    if isinstance(obj, str):
        return scrub(obj)
    return obj


def format_exception() -> str:
    """The current exception's traceback, scrubbed (``MLSTEP_DEBUG=1`` output)."""
    return scrub(traceback.format_exc())
