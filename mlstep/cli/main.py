"""``mlstep``: the typer app and the error boundary.

The console script is ``mlstep = mlstep.cli.main:app``; calling ``app()`` runs :func:`main`, which maps
every error to one line on stderr (``mlstep: error: ...``) and an exit code:

    0    success, every gate passed
    1    a gate failed (GateFailedError): the outputs and the report are written and say what failed;
         for ``promote``: the version did not pass mlstep's gates
    2    bad input or usage, an unknown MLflow model/version/alias, an MLflow store that did not answer (MlstepError subclasses, click usage errors such as a missing --output)
    3    internal error: an exception mlstep did not expect, or a variant it wrote that ONNX Runtime cannot
         load (kept aside for the report), i.e. a bug; please report it
    130  interrupted (SIGINT); 143 SIGTERM, 129 SIGHUP (a cancelled CI job): staging and temp folders removed

Tracebacks are printed only when the environment variable MLSTEP_DEBUG is set (to anything but 0).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Annotated

import typer
import typer.core

from mlstep import __version__
from mlstep.cli import benchmark as benchmark_cmd
from mlstep.cli import export as export_cmd
from mlstep.cli import optimize as optimize_cmd
from mlstep.cli import plan as plan_cmd
from mlstep.cli import promote as promote_cmd
from mlstep.cli import relay as relay_cmd
from mlstep.errors import MlstepError

INTERNAL_ERROR = 3
DEBUG_ENV = "MLSTEP_DEBUG"


class MlstepApp(typer.Typer):
    """A Typer whose call goes through :func:`main` (one-line errors, exit codes) and exits."""

    def __call__(self, *args, **kwargs):  # the console script calls app() with no arguments
        sys.exit(main())


app = MlstepApp(
    name="mlstep",
    help="Fuse transformer ONNX models into ONNX Runtime's fused operators, make fp32/fp16 variants, "
         "prove parity and measure latency, and register them in MLflow.",
    epilog="Exit codes: 0 ok, 1 a gate failed, 2 bad input or usage, 3 internal error. "
           f"Set {DEBUG_ENV}=1 for tracebacks.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"mlstep {__version__}")
        raise typer.Exit()


VersionOpt = Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                          help="Print the version and exit.")]


@app.callback()
def _root(version: VersionOpt = False) -> None:
    """Fuse transformer ONNX models into ONNX Runtime's fused operators, make fp32/fp16 variants, prove
    parity and measure latency."""


app.command("optimize", no_args_is_help=True)(optimize_cmd.optimize)
app.command("benchmark", no_args_is_help=True)(benchmark_cmd.benchmark)
app.command("promote", no_args_is_help=True)(promote_cmd.promote)
app.command("export", no_args_is_help=True)(export_cmd.export)
app.command("plan")(plan_cmd.plan)
app.command("relay", no_args_is_help=True)(relay_cmd.relay)


@app.command("version")
def version() -> None:
    """Print the version."""
    typer.echo(f"mlstep {__version__}")


class _Option(typer.core.TyperOption):
    """Help for people: a flag shows no type, a value shows its metavar (``N``, ``DIR``) or its choices."""

    def display_type_rich(self, ctx):
        if self.is_flag:
            return None
        shown = super().display_type_rich(ctx)
        return shown[1:-1] if shown and shown.startswith("<") and shown.endswith(">") else shown

    def _get_number_range_help_str(self):
        return None                     # the help text states the bounds in words


class _Argument(typer.core.TyperArgument):
    """``SOURCE`` in the usage line (``[SOURCE]`` when optional), as every other tool writes it."""

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")

    def display_type_rich(self, ctx):
        return None


def _for_people(command) -> None:
    """Give every parameter of ``command`` (and of its subcommands) the help display above."""
    for param in command.params:
        _adopt(param)
    made = command.get_help_option             # --help is made lazily, per context

    def help_option(ctx, made=made):
        return _adopt(made(ctx))

    command.get_help_option = help_option
    for sub in getattr(command, "commands", {}).values():
        _for_people(sub)


def _adopt(param):
    if type(param) is typer.core.TyperOption:
        param.__class__ = _Option
    elif type(param) is typer.core.TyperArgument:
        param.__class__ = _Argument
    return param


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI on ``argv`` (default ``sys.argv[1:]``) and return the exit code."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    command = typer.main.get_command(app)
    _for_people(command)
    try:
        rv = command.main(args=list(argv) if argv is not None else None, prog_name="mlstep",
                          standalone_mode=False)
        return rv if isinstance(rv, int) else 0
    except MlstepError as err:
        return _fail(str(err), err.exit_code, debug)
    except typer.TyperException as err:     # typer's (vendored click) usage and parameter errors
        ctx = getattr(err, "ctx", None)
        if type(err).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())       # help on stdout, usage exit code (2)
            return err.exit_code
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        return _fail(err.format_message() + hint, err.exit_code, debug)
    except typer.Abort:
        return _fail("interrupted", 130, debug)
    except KeyboardInterrupt:
        return _fail("interrupted", 130, debug)
    except Exception as err:  # a bug: say so in one line, the traceback is one variable away
        return _fail(f"internal error: {type(err).__name__}: {err} (set {DEBUG_ENV}=1 for a traceback)",
                     INTERNAL_ERROR, debug)


def _fail(message: str, code: int, debug: bool) -> int:
    from mlstep.redact import format_exception, scrub

    if debug and sys.exc_info()[0] is not None:
        print(format_exception(), end="", file=sys.stderr)     # scrubbed: MLflow's messages quote URIs
    line = " ".join(scrub(message).split()) or "failed"
    print(f"mlstep: error: {line}", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
