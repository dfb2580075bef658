"""The command line: a thin typer layer. One module per command; no logic here (it lives in the library).

Exit codes: 0 success and every gate passed; 1 a gate failed (outputs and report written); 2 bad input or
usage (one line on stderr); 3 an internal error (a bug in mlstep: one line, a traceback with
MLSTEP_DEBUG=1); 130 interrupted.
"""
from mlstep.cli.main import app, main

__all__ = ["app", "main"]
