"""The processes of a local run: plain subprocesses, or forks of one warm interpreter.

Ten participants each importing torch and paying its first-step warm-up at
once cost a 2-core machine tens of seconds before the first round. A local run
therefore forks its participants (and the held-out scorer) from one
*forkserver*: a clean interpreter started at the beginning of the run that
imports the node's modules and runs one tiny training step (see
``fedcrm_node.preload``) while the launcher issues certificates and starts the
aggregator. Every fork then starts warm, shares the imported pages
copy-on-write, and runs exactly what ``python -m fedcrm_node`` runs.

The forkserver is a fresh process (not a fork of the launcher), so nothing of
the launcher's state — threads, gRPC, open files — leaks into the participants;
torch stays single-threaded in it so forking is safe. The launcher itself never
imports torch or pandas.
"""

from __future__ import annotations

import importlib
import multiprocessing
import multiprocessing.connection
import os
import runpy
import subprocess
import sys
from pathlib import Path
from typing import Any, Protocol

__all__ = ["Child", "Warm", "run_module", "start_subprocess"]

# Every child's defaults: many children share the machine (one thread each avoids oversubscription), and
# their logs are read while they run (unbuffered).
_CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


class Child(Protocol):
    """What the launcher needs of any child process (``subprocess.Popen`` has exactly this)."""

    pid: int

    def poll(self) -> int | None: ...
    def wait(self, timeout: float | None = None) -> int: ...
    def terminate(self) -> None: ...
    def kill(self) -> None: ...


def child_env() -> dict[str, str]:
    return {**_CHILD_ENV, **os.environ, "PYTHONUNBUFFERED": "1"}


def start_subprocess(module: str, argv: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """``python -m module argv...`` with stdout and stderr appended to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen([sys.executable, "-m", module, *argv], stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=child_env())


def _redirect_output(log_path: str) -> None:
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def run_module(module: str, argv: list[str], log_path: str) -> None:
    """In a forked child: run ``module`` as ``__main__`` with ``argv``, as ``python -m module argv`` would."""
    _redirect_output(log_path)
    sys.argv = [module, *argv]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


def call(module: str, function: str, log_path: str, *args: Any) -> None:
    """In a forked child: ``module.function(*args)``, imported by name so the launcher never imports it."""
    _redirect_output(log_path)
    getattr(importlib.import_module(module), function)(*args)


class _Forked:
    """A forkserver child seen through the ``Child`` protocol."""

    def __init__(self, process: multiprocessing.process.BaseProcess) -> None:
        self._process = process
        self.pid = process.pid or 0

    def poll(self) -> int | None:
        return self._process.exitcode

    def wait(self, timeout: float | None = None) -> int:
        self._process.join(timeout)
        if self._process.exitcode is None:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0)
        return self._process.exitcode

    def terminate(self) -> None:
        self._process.terminate()

    def kill(self) -> None:
        self._process.kill()


class Warm:
    """Forks of one interpreter that has imported ``preload`` (module names) before the first fork.

    ``start()`` boots the forkserver in the background and returns at once; the
    first ``fork`` waits for its preloading to finish.
    """

    def __init__(self, preload: list[str]) -> None:
        for key, value in _CHILD_ENV.items():
            # The forkserver inherits this process's environment when it boots.
            os.environ.setdefault(key, value)
        self._ctx = multiprocessing.get_context("forkserver")
        self._ctx.set_forkserver_preload(preload)

    def start(self) -> None:
        from multiprocessing import forkserver

        forkserver.ensure_running()

    def run_module(self, module: str, argv: list[str], log_path: Path) -> Child:
        return self._start(run_module, (module, argv, str(log_path)))

    def call(self, module: str, function: str, log_path: Path, *args: Any) -> Child:
        return self._start(call, (module, function, str(log_path), *args))

    def pipe(self) -> tuple[multiprocessing.connection.Connection, multiprocessing.connection.Connection]:
        return self._ctx.Pipe()

    def _start(self, target: Any, args: tuple[Any, ...]) -> Child:
        process = self._ctx.Process(target=target, args=args, daemon=True)
        process.start()
        return _Forked(process)
