"""The output folder: staged beside it, committed atomically, never deleting what the run did not create.

    with interruptible():                         # SIGINT/SIGTERM/SIGHUP -> Interrupted (exit 130/143/129)
        with staged_output("out") as staging:     # .out.mlstep-XXXX beside "out", same filesystem
            ...write into staging...
        # on success: "out" replaced by the staging folder; on any error or signal: staging removed

Cases handled:
- Before any work (:func:`Guard`): ``--output`` may be absent, an empty folder or an earlier mlstep output
  (holds report.json); anything else (a file, a symlink, a foreign non-empty folder such as ``-o .`` in a
  project) is refused and left alone.
- At commit the guard is checked again against what was seen at the start: a folder that appeared at
  ``--output`` during the run, or one that was swapped or stopped being an mlstep output, is kept as it is
  and the run fails (``OutputError``, exit 2; the staged outputs are removed).
- Names: every path component must fit in 255 bytes (``UsageError`` otherwise, before anything is
  written); the staging folder's own name is shortened so that a legal 250-byte output name works.
- Parent folders that the run created are removed again on failure.
- Signals: :func:`interruptible` turns SIGINT, SIGTERM and SIGHUP into ``KeyboardInterrupt`` at the point
  the program is (so every ``finally`` and context manager cleans up: staging, downloads, the gates' temp
  folders) and then into ``Interrupted(signum)`` (exit 128 + signum). A second signal during cleanup is
  recorded, not raised, so cleanup finishes.
- :func:`check_store_outside`: an embedded MLflow store (a sqlite file or a local folder, and the
  ``mlruns`` artifact root beside the working directory) must not live inside the output folder, which the
  commit replaces (``-o .`` would delete ``mlflow.db`` and ``mlruns`` that this run wrote to).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from mlstep.errors import Interrupted, OutputError, UsageError

NAME_MAX = 255                           # bytes per path component (Linux, macOS)
SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)
_RANDOM = 8                              # mkdtemp's random suffix


# ------------------------------------------------------------------------------------------- names

def check_names(path: str | os.PathLike, what: str) -> None:
    """``UsageError`` when a component of ``path`` is longer than the filesystem allows (255 bytes)."""
    for part in Path(os.fspath(path)).parts:
        size = len(os.fsencode(part))
        if size > NAME_MAX:
            raise UsageError(f"{what}: a path component is {size} bytes long (at most {NAME_MAX}): "
                             f"{part[:40]}...")


def _prefix(name: str, tag: str) -> str:
    """``.<name>.<tag>`` shortened (in bytes) so that the temporary folder's full name fits NAME_MAX."""
    room = NAME_MAX - _RANDOM - len(os.fsencode(f"..{tag}"))
    raw = os.fsencode(name)[:room]
    return f".{raw.decode('utf-8', errors='ignore')}.{tag}"


# ------------------------------------------------------------------------------------------- guard

@dataclass(frozen=True)
class Guard:
    """What was at the output path when the run started (its identity is checked again at commit)."""

    target: Path
    shown: str
    identity: tuple[int, int] | None      # (st_dev, st_ino) of the existing folder, None when absent

    @classmethod
    def take(cls, output_dir: str | os.PathLike) -> "Guard":
        target = Path(output_dir).expanduser().absolute()
        shown = os.fspath(output_dir)
        _check_replaceable(target, shown)
        identity = None
        if target.exists():
            st = target.stat()
            identity = (st.st_dev, st.st_ino)
        return cls(target, shown, identity)

    def recheck(self) -> None:
        """Raise ``OutputError`` unless the output path is as it was at the start (or still replaceable)."""
        target = self.target
        if self.identity is None:
            if target.exists() or target.is_symlink():
                raise OutputError(f"{self.shown}: appeared while the run was working; it is kept as it is and "
                                  "nothing was written there (run again, or choose another --output)")
            return
        if not target.exists() or target.is_symlink():
            raise OutputError(f"{self.shown}: was moved or removed while the run was working; nothing was "
                              "written there")
        st = target.stat()
        if (st.st_dev, st.st_ino) != self.identity:
            raise OutputError(f"{self.shown}: was replaced by another folder while the run was working; it is "
                              "kept as it is and nothing was written there")
        _check_replaceable(target, self.shown)


def _check_replaceable(target: Path, shown: str) -> None:
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise OutputError(f"{shown}: exists and is not a directory")
        if any(target.iterdir()) and not (target / "report.json").is_file():
            raise OutputError(f"{shown}: exists, is not empty and is not an mlstep output; refusing to replace it")


# ------------------------------------------------------------------------------------------ staging

@contextlib.contextmanager
def staged_output(output_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``output_dir``, renamed to ``output_dir`` when the block succeeds (after the
    guard is checked again); removed, with the parents this call created, on any error or signal."""
    guard = Guard.take(output_dir)
    target = guard.target
    created = _make_parents(target.parent, guard.shown)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(target.name, "mlstep-"), dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())          # mkdtemp makes 0o700; the result is an ordinary folder
    except OSError as err:
        _remove_created(created)
        raise OutputError(f"{guard.shown}: cannot write beside it ({err.strerror or err})") from err
    try:
        yield tmp
        guard.recheck()
        _replace(tmp, target, guard.shown)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_parents(parent: Path, shown) -> list[Path]:
    missing = []
    probe = parent
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{shown}: cannot create it: {probe} is not a directory")
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except OSError as err:
            _remove_created(created)
            raise OutputError(f"{shown}: cannot create {folder} ({err.strerror or err})") from err
        created.append(folder)
    return created


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _replace(tmp: Path, target: Path, shown) -> None:
    try:
        if not target.exists():
            os.rename(tmp, target)
            return
        old = Path(tempfile.mkdtemp(prefix=_prefix(target.name, "mlstep-old-"), dir=target.parent))
        try:
            os.rename(target, old / "previous")
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(old / "previous", target)
                raise
        finally:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise OutputError(f"{shown}: cannot move the result into place ({err.strerror or err})") from err


# --------------------------------------------------------------------------------------- the store

def local_store_paths(tracking_uri: str, cwd: Path | None = None) -> list[Path]:
    """The local files an embedded MLflow store writes: the sqlite file or file-store folder, and (for a
    sqlite store) the default ``mlruns`` artifact root in the working directory. [] for a server."""
    cwd = cwd or Path.cwd()
    uri = tracking_uri.strip()
    if uri.startswith("sqlite:"):
        rest = unquote(uri[len("sqlite:///"):].split("?", 1)[0]) if uri.startswith("sqlite:///") else ""
        store = [Path(rest) if rest.startswith("/") else (cwd / rest).absolute()] if rest else []
        return store + [(cwd / "mlruns").absolute()]
    parsed = urlparse(uri)
    if parsed.scheme == "file":
        return [Path(unquote(parsed.path)).absolute()]
    if not parsed.scheme or (len(parsed.scheme) == 1 and os.name == "nt"):
        return [(cwd / uri).absolute()]
    return []


def check_store_outside(output_dir: str | os.PathLike, tracking_uri: str) -> None:
    """``UsageError`` (exit 2) when the embedded store would live inside the output folder."""
    target = Path(output_dir).expanduser().absolute()
    for path in local_store_paths(tracking_uri):
        if path == target or target in path.parents:
            raise UsageError(f"the MLflow store {path} lies inside the output folder {output_dir}, which this run "
                             "replaces; choose another --output or set MLFLOW_TRACKING_URI")


# --------------------------------------------------------------------------------------------- signals

class _State:
    received: int | None = None


@contextlib.contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP -> cleanup (via ``KeyboardInterrupt``) -> ``Interrupted(signum)``.

    Outside the main thread (where Python cannot install handlers) only Ctrl-C's own KeyboardInterrupt is
    mapped (to exit 130)."""
    state = _State()

    def handler(signum, frame):
        if state.received is None:
            state.received = signum
            raise KeyboardInterrupt
        # a second signal while cleaning up: recorded, not raised, so the cleanup finishes

    saved = {}
    if threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            saved[sig] = signal.signal(sig, handler)
    try:
        yield
    except KeyboardInterrupt as err:
        raise Interrupted(state.received or signal.SIGINT) from err
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)
