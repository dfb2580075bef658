"""Typed errors. Each maps to one line on stderr and an exit code (see ``mlstep.cli``)."""
from __future__ import annotations


class MlstepError(Exception):
    """Base class: ``exit_code`` is what the CLI exits with; ``str(err)`` is the one line it prints."""

    exit_code = 2


class BadInputError(MlstepError):
    """The input model, URI or an option is unusable (exit 2)."""


class UsageError(BadInputError):
    """Options that contradict each other or the graph (exit 2)."""


class OutputError(MlstepError):
    """The output location cannot be written (exit 2)."""


class GateFailedError(MlstepError):
    """A parity or latency gate failed (exit 1)."""

    exit_code = 1


class RegistryError(MlstepError):
    """The MLflow server/store refused or did not answer (exit 2)."""


class VariantLoadError(MlstepError):
    """A variant mlstep wrote does not load in ONNX Runtime: mlstep's bug (exit 3), the model kept aside."""

    exit_code = 3


class Interrupted(MlstepError):
    """SIGINT / SIGTERM / SIGHUP: staging and temporary folders removed; exit 128 + the signal number."""

    def __init__(self, signum: int):
        import signal

        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(f"interrupted ({signal.Signals(signum).name})")
