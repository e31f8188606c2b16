"""Worker processes that die with their parent, ignore Ctrl-C, and end at once when the parent stops.

``WorkerPool`` is the one way this package starts processes (study steps, report figures, the
organism build's helpers). It is a spawned ``ProcessPoolExecutor`` with three changes:

- **A worker dies with its parent**, whatever ended the parent (``kill -9`` included): on Linux
  ``PR_SET_PDEATHSIG`` has the kernel send it SIGKILL; everywhere a thread checks every
  ``WATCH_SECONDS`` that its parent is still its parent and ends it otherwise. Without this a
  killed study left its workers (hundreds of MB each) and the resource tracker running forever:
  each worker holds a write end of the pool's queues, so it never sees end-of-file.
  ``PR_SET_PDEATHSIG`` fires when the *thread* that started the worker ends; workers start in
  ``submit``, so use a pool from the thread that created it (as every caller here does).
- **A worker ignores SIGINT.** Ctrl-C in a terminal signals the whole process group; the workers
  used to raise ``KeyboardInterrupt`` each, printing a traceback apiece. The parent alone decides:
  it ignores SIGINT while ``submit`` starts a worker, so the worker ignores it from its first
  instruction (Python keeps an inherited ``SIG_IGN``), not only once its imports are done. A Ctrl-C
  that lands in those few milliseconds is lost; press it again.
- **Leaving the ``with`` block on an exception** (``KeyboardInterrupt``, an error, a closed
  generator) kills the workers instead of waiting for their running tasks, which could take
  minutes. ``kill()`` does the same by hand.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

WATCH_SECONDS = 0.5      # how often a worker checks its parent (the fallback where prctl is missing)
JOIN_SECONDS = 5.0       # how long kill() waits for a killed worker to be gone
PR_SET_PDEATHSIG = 1     # <linux/prctl.h>


def _die_with(parent: int) -> None:
    """In a worker: end this process as soon as ``parent`` is gone."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        except (OSError, AttributeError):   # no libc prctl: the watchdog below still works
            pass

    def watch() -> None:   # also covers a parent that died before prctl was set
        while os.getppid() == parent:
            time.sleep(WATCH_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="projlens-parent-watch", daemon=True).start()


def _start(parent: int, initializer, initargs: tuple) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(parent)
    # tqdm's default lock holds a multiprocessing RLock, a named semaphore: a killed worker cannot
    # unlink it, and the resource tracker then prints "leaked semaphore objects" under the parent's
    # last line. A worker's bars are its own, so a thread lock serves.
    from tqdm import tqdm
    tqdm.set_lock(threading.RLock())
    if initializer is not None:
        initializer(*initargs)


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored inside the block (only the main thread can change a handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGINT, old)


class WorkerPool(ProcessPoolExecutor):
    """``n`` spawned worker processes; ``initializer(*initargs)`` runs once in each."""

    def __init__(self, n: int, initializer=None, initargs: tuple = ()):
        super().__init__(n, mp_context=mp.get_context("spawn"), initializer=_start,
                         initargs=(os.getpid(), initializer, tuple(initargs)))

    def submit(self, fn, /, *args, **kwargs):
        with _sigint_ignored():      # a worker, if one starts now, inherits SIG_IGN
            return super().submit(fn, *args, **kwargs)

    def kill(self) -> None:
        """End every worker now (SIGKILL) and shut the pool down; unfinished tasks fail with BrokenProcessPool."""
        with _sigint_ignored():      # a second Ctrl-C must not leave workers behind
            procs = list((self._processes or {}).values())
            for p in procs:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    p.kill()
            self.shutdown(wait=False)    # no cancel_futures: the manager thread fails the pending ones itself
            deadline = time.monotonic() + JOIN_SECONDS
            for p in procs:
                with contextlib.suppress(OSError, ValueError, AttributeError):
                    p.join(max(0.0, deadline - time.monotonic()))

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.kill()
            return False
        return super().__exit__(exc_type, exc, tb)
