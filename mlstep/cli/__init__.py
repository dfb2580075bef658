"""The command line: a thin typer layer. One module per command; no logic here (it lives in the library).

Exit codes: 0 success and every gate passed; 1 a gate failed (outputs and report written); 2 bad input or
usage (one line on stderr); 3 an internal error (a bug in mlstep: one line, a traceback with
MLSTEP_DEBUG=1); 130 interrupted.
"""
from collections.abc import Iterable


def comma_list(values: Iterable[str] | None) -> tuple[str, ...]:
    """``-p fp32,fp16`` and ``-p fp32 -p fp16`` alike: every comma-separated word of every value, in order."""
    return tuple(w.strip() for v in values or () for w in v.split(",") if w.strip())


from mlstep.cli.main import app, main  # noqa: E402  (main imports the commands, which import comma_list)

__all__ = ["app", "comma_list", "main"]
