"""A deadline on each read of a sample stream: a shard that yields nothing for ``timeout`` seconds (a hung NFS
mount, a stuck object-store read, a ``pipe:`` command that never writes) raises ``StalledRead`` naming it,
instead of hanging the run.

The deadline is a real-time interval timer (SIGALRM), armed only while the stream is asked for its next
sample: a signal interrupts a blocked read where a watchdog thread could not, and its handler's exception
leaves the read like any other error. Signals reach only a process's main thread, which is where a DataLoader
worker, or a loader without workers, iterates; elsewhere the stream runs without a deadline. A timer someone
else armed (pytest-timeout's) is put back after each read. Cost: four system calls per sample.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterable, Iterator

from common.errors import VitpipeError


class StalledRead(VitpipeError, RuntimeError):
    """A stream produced no sample within its deadline; the message names the shard, rank and worker."""


def watched(samples: Iterable, timeout: float, what: str) -> Iterator:
    """``samples``, each ``next`` of which must return within ``timeout`` seconds (0: no deadline); ``what``
    names the stream in the error (the shard, its rank and worker)."""
    it = iter(samples)
    if not timeout or threading.current_thread() is not threading.main_thread():
        yield from it
        return

    def expire(signum, frame):
        raise StalledRead(f"{what}: no sample for {timeout:g} s (data.stall_timeout); stopping. Check the "
                          "storage or the command, then rerun to resume")

    while True:
        previous = signal.signal(signal.SIGALRM, expire)
        other, _ = signal.setitimer(signal.ITIMER_REAL, timeout)
        started = time.monotonic()
        try:
            sample = next(it)
        except StopIteration:
            return
        finally:
            signal.setitimer(signal.ITIMER_REAL, max(other - (time.monotonic() - started), 1e-3) if other else 0)
            signal.signal(signal.SIGALRM, previous)
        yield sample
