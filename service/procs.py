"""Start, wait for and stop the stack's processes (memcached, gunicorn instances, nginx).

Shared by the launcher and the tests so that both start the real programs the same way. Every process is
tracked by its own pid and stopped by that pid only; nothing here ever kills by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def children_by_parent() -> dict[int, list[int]]:
    """Every running process's children, right now (parent pid -> pids), read from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):  # the process ended meanwhile
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    return children


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def tcp_ready(host: str, port: int) -> Callable[[], bool]:
    """A readiness check: something accepts connections on host:port."""

    def check() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False

    return check


def unix_ready(path: str | os.PathLike[str]) -> Callable[[], bool]:
    """A readiness check: something accepts connections on a unix socket."""

    def check() -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(0.5)
                sock.connect(str(path))
                return True
        except OSError:
            return False

    return check


def http_ready(url: str) -> Callable[[], bool]:
    """A readiness check: ``url`` answers with any HTTP status below 500."""

    def check() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                return resp.status < 500
        except urllib.error.HTTPError as exc:
            return exc.code < 500
        except OSError:
            return False

    return check


class Process:
    """One child process with its log file, stopped by pid (and its process group) only."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = Path(log)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self.popen = subprocess.Popen(
                self.argv,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,  # own process group: stopping it reaches its workers, nobody else
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def wait_ready(self, check: Callable[[], bool], timeout: float = 30.0) -> None:
        """Block until ``check()`` passes; fail fast with the log's tail if the process dies first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}: {self.log_tail()}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name} not ready after {timeout:.0f}s: {self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal the process group we created, then SIGKILL it if it outlives ``timeout``."""
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(5)
        else:
            self.popen.wait()

    def kill(self) -> None:
        """SIGKILL the main process only (fault tests: its children are left to their own fate)."""
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            self.popen.wait(5)
