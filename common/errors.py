"""One family for user errors: the entry points print them as one line and exit 2; anything else is a bug
and keeps its traceback.

Each package's error (ConfigError, LoaderError, ShardError, ...) subclasses ``VitpipeError`` and keeps the
builtin base it always had (``ValueError``, ``RuntimeError``), so code that caught that still does.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from common.redact import redact


class VitpipeError(Exception):
    """Bad input, or a state the user has to fix; the message is one line naming the file, key or folder."""


#: what an entry point turns into one line and exit 2: ours, and the system's (disk full, permission denied)
USER_ERRORS = (VitpipeError, OSError)


def user_message(e: Exception) -> str:
    """One line for a user error: an OSError as ``FILE: reason`` (its errno spelled out), else the message."""
    if isinstance(e, OSError) and e.strerror:
        files = [str(f) for f in (e.filename, e.filename2) if f is not None]
        return ": ".join([" -> ".join(files), e.strerror] if files else [e.strerror])
    text = str(e) or type(e).__name__
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        # torch re-raises an error from a DataLoader worker with the worker's traceback as its message
        text = text.rstrip().splitlines()[-1].split(": ", 1)[-1]
    return text


class Stopped(Exception):
    """A run that stopped cleanly on a signal (a preemption notice) after saving where it was: not an error, but
    not finished either; the entry point prints the message and exits with ``status`` (128 + the signal's
    number, as a shell reports a process the signal ended: 143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def exit_status(prog: str, work: Callable[[], int | None]) -> int:
    """Run an entry point's ``work`` and return its exit status (0 unless it returns another): a user error
    becomes one line ``PROG: error: MESSAGE`` on stderr and status 2; a clean stop on a signal one line
    ``PROG: MESSAGE`` and its status; anything else keeps its traceback."""
    try:
        return work() or 0
    except Stopped as e:
        if str(e):  # empty on every rank but the main one: one line per launch
            say(f"{prog}: {e}")
        return e.status
    except USER_ERRORS as e:
        say(f"{prog}: error: {redact(user_message(e))}")
        return 2


def say(line: str) -> None:
    """``line`` on stderr in one write: the ranks of a launch share the stream, and print's two writes (the text,
    then the newline; unbuffered under PYTHONUNBUFFERED) let two ranks' lines run into one."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


class TrainingError(VitpipeError, RuntimeError):
    """The run cannot go on (a non-finite loss, a checkpoint that cannot be written or resumed, ...)."""
