"""Run the whole phizer stack on one machine: memcached, one gunicorn instance per core, nginx in front.

``python -m service.launcher`` (what ``make run`` calls) starts everything, prints the URL and stays in the
foreground; Ctrl-C or SIGTERM stops every process it started, by pid, and leaves no socket behind. While it
runs, an instance that dies is restarted (nginx sends its keys to the next instance meanwhile).

The same machinery is a Python API for the tests and the bench, so they exercise the real stack::

    with Stack(state_dir, port=free_port(), instances=2, env={"PHIZER_ORIGINS": "s3://bucket"}) as stack:
        requests.get(stack.url + "/small/photo.jpg")

A second stack that shares the first one's memcached is what a second host looks like:
``Stack(other_dir, port=other_port, memcached=first.memcached_servers)``.
"""

from __future__ import annotations

import argparse
import logging
import os
import pwd
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import FrameType, TracebackType

from service.config import REPO_ROOT, load_config
from service.nginx_conf import config_vars, render_nginx_conf
from service.procs import Process, free_port, http_ready, tcp_ready

GUNICORN_CONF = REPO_ROOT / "service" / "gunicorn_conf.py"
DEFAULT_STATE_DIR = REPO_ROOT / "state"
SAMPLES = REPO_ROOT / "samples"  # the default config's origin
WSGI_APP = "service.wsgi:app"
NGINX = "nginx"
MEMCACHED = "memcached"

log = logging.getLogger("phizer.launcher")


def instance_ready(sock: Path) -> Callable[[], bool]:
    """Readiness of one instance: its app answers ``GET /healthz`` with 200 on its unix socket.

    The socket accepts connections as soon as gunicorn's master has bound it, before the worker has
    imported the app, so a bare connect would call an instance ready that then fails every request.
    """

    def check() -> bool:
        try:
            with socket.socket(socket.AF_UNIX) as conn:
                conn.settimeout(2)
                conn.connect(str(sock))
                conn.sendall(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
                return conn.recv(64).split(b"\r\n", 1)[0].split(b" ")[1:2] == [b"200"]
        except OSError:
            return False

    return check


def _check_port_free(host: str, port: int) -> None:
    """Fail with a clear message before nginx would, and before a readiness check could be fooled by
    whatever already answers on that port (often a previous run's nginx)."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise RuntimeError(f"cannot listen on {host}:{port}: {exc.strerror} (set PHIZER_PORT or --port)") from exc


class Stack:
    """One host's worth of phizer: memcached (unless shared), ``instances`` gunicorn instances and nginx.

    All runtime files live under ``state_dir``: ``nginx.conf``, ``nginx.pid``, ``run/`` (instance sockets),
    ``logs/`` (access.log, error.log, one log per process), ``cache/`` (nginx's rendition cache) and
    nginx's temp folders.
    Give parallel stacks different state folders and ports.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike[str] = DEFAULT_STATE_DIR,
        port: int = 8080,
        instances: int | None = None,
        host: str = "127.0.0.1",
        memcached: Sequence[str] | None = None,
        env: Mapping[str, str] | None = None,
        memcached_mb: int = 256,
        supervise: bool = True,
    ) -> None:
        """``memcached``: servers to share (host:port); None means $PHIZER_MEMCACHED if set (in ``env`` or
        the environment), else start a private memcached. ``env`` is added to every instance's environment
        (PHIZER_ORIGINS, PHIZER_CONFIG, AWS_*, ...). ``supervise=False`` leaves dead instances dead (a
        test of what nginx does when no instance answers)."""
        self.state_dir = Path(state_dir).resolve()
        self.port = port
        self.host = host
        self.instance_count = instances or os.cpu_count() or 1
        self.env = dict(env or {})
        self.memcached_mb = memcached_mb
        self.supervise = supervise
        merged = {**os.environ, **self.env}
        self.config = load_config(environ=merged)  # a bad config stops us here, before anything starts
        shared = memcached if memcached is not None else merged.get("PHIZER_MEMCACHED")
        if isinstance(shared, str):
            shared = [s.strip() for s in shared.split(",") if s.strip()]
        self._shared_memcached = None if shared is None else list(shared)
        self.memcached_servers: list[str] = list(shared or [])
        self.memcached: Process | None = None
        self.instances: list[Process] = []
        self.nginx: Process | None = None
        self.restarts: list[tuple[str, int, int]] = []  # (instance, dead pid, new pid), for logs and tests
        self.failure: str | None = None  # set when nginx or memcached died: the stack cannot heal that
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    # Paths -------------------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "*") else self.host
        return f"http://{host}:{self.port}"

    @property
    def logs(self) -> Path:
        return self.state_dir / "logs"

    @property
    def access_log(self) -> Path:
        return self.logs / "access.log"

    @property
    def metrics_dir(self) -> Path:
        """prometheus_client's multiprocess folder: every instance's metric files (emptied at each start)."""
        return self.state_dir / "run" / "metrics"

    def instance_name(self, index: int) -> str:
        return f"app-{index}"

    def socket_path(self, index: int) -> Path:
        return self.state_dir / "run" / f"{self.instance_name(index)}.sock"

    # Start -------------------------------------------------------------------------------------------
    def start(self) -> Stack:
        """Start everything and wait until each part answers; on any failure stop what did start."""
        try:
            _check_port_free(self.host, self.port)
            for sub in ("logs", "run"):
                (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.metrics_dir, ignore_errors=True)  # a previous run's counters are not this one's
            self.metrics_dir.mkdir()
            if self._shared_memcached is None:
                self._start_memcached()
            self.instances = [self._spawn_instance(i) for i in range(self.instance_count)]
            for i, proc in enumerate(self.instances):
                proc.wait_ready(instance_ready(self.socket_path(i)), timeout=60)
            self._start_nginx()
        except BaseException:
            self.stop()
            raise
        if self.supervise:
            self._supervisor = threading.Thread(target=self._supervise, name="phizer-supervisor", daemon=True)
            self._supervisor.start()
        return self

    def _start_memcached(self) -> None:
        port = free_port()
        # Originals are chunked below 1 MB by the app, but a bigger item limit costs nothing and lets a
        # pool be shared with tools that store whole originals; -I may be at most half of -m.
        argv = [MEMCACHED, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", str(self.memcached_mb), "-I", "16m"]
        if os.geteuid() == 0:
            argv += ["-u", "nobody"]  # memcached refuses to run as root; it writes no files
        self.memcached = Process(MEMCACHED, argv, log=self.logs / "memcached.log")
        self.memcached.wait_ready(tcp_ready("127.0.0.1", port), timeout=10)
        self.memcached_servers = [f"127.0.0.1:{port}"]

    def _spawn_instance(self, index: int) -> Process:
        name = self.instance_name(index)
        argv = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "--bind", f"unix:{self.socket_path(index)}"]
        env = {
            **self.env,
            "PHIZER_INSTANCE": name,
            "PHIZER_MEMCACHED": ",".join(self.memcached_servers),
            "PHIZER_SLOTS_DIR": str(self.state_dir / "run" / "slots"),  # the host's render budget (budget.py)
            "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir),  # one /metrics for every instance (metrics.py)
            "PHIZER_NGINX_CACHE_DIR": str(self.state_dir / "cache"),  # the template's cache_dir: purge.py deletes there
        }
        return Process(name, [*argv, WSGI_APP], log=self.logs / f"{name}.log", env=env, cwd=REPO_ROOT)

    def _start_nginx(self) -> None:
        conf = self.state_dir / "nginx.conf"
        conf.write_text(
            render_nginx_conf(
                **config_vars(self.config),
                state_dir=str(self.state_dir),
                listen=f"{self.host}:{self.port}",
                upstreams=[f"unix:{self.socket_path(i)}" for i in range(self.instance_count)],
                # As root, workers run as root too: the state folder (often a 0700 temp folder in tests)
                # belongs to the invoking user; a deployment (Ansible) sets its own unprivileged user.
                user=pwd.getpwuid(os.geteuid()).pw_name if os.geteuid() == 0 else "",
                admin_allow=_split({**os.environ, **self.env}.get("PHIZER_ADMIN_ALLOW", "")),  # besides loopback
            )
        )
        argv = [NGINX, "-p", str(self.state_dir), "-c", str(conf), "-e", str(self.logs / "error.log")]
        self.nginx = Process(NGINX, [*argv, "-g", "daemon off;"], log=self.logs / "nginx.log")
        self.nginx.wait_ready(http_ready(self.url + "/healthz"), timeout=20)

    # Supervise ---------------------------------------------------------------------------------------
    def _supervise(self) -> None:
        """Restart instances that die (with backoff if one keeps dying); note if nginx or memcached dies."""
        failures = [0] * self.instance_count
        not_before = [0.0] * self.instance_count
        while not self._stopping.wait(0.2):
            for part in (self.nginx, self.memcached):
                if part is not None and not part.alive() and self.failure is None:
                    self.failure = f"{part.name} (pid {part.pid}) exited with {part.popen.returncode}"
                    log.error("%s: %s", self.failure, part.log_tail(5))
            for i, proc in enumerate(self.instances):
                if proc.alive() or time.monotonic() < not_before[i] or self._stopping.is_set():
                    continue
                new = self._spawn_instance(i)
                self.instances[i] = new
                log.warning(
                    "%s (pid %d) exited with %s; restarting it as pid %d",
                    proc.name,
                    proc.pid,
                    proc.popen.returncode,
                    new.pid,
                )
                ready = instance_ready(self.socket_path(i))
                try:  # stop() must not wait for a restart in progress: it stops the new process itself
                    new.wait_ready(lambda: self._stopping.is_set() or ready(), timeout=60)  # noqa: B023
                except (RuntimeError, TimeoutError) as exc:
                    failures[i] += 1
                    not_before[i] = time.monotonic() + min(30, 2 ** failures[i])
                    log.error("%s did not come back: %s", proc.name, exc)
                    continue
                if self._stopping.is_set():
                    return
                failures[i] = 0
                self.restarts.append((proc.name, proc.pid, new.pid))
                log.warning("%s is back (pid %d)", proc.name, new.pid)

    # Stop --------------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop what this stack started (nginx first, so no request meets a half-stopped instance)."""
        self._stopping.set()
        if self._supervisor is not None:
            self._supervisor.join()
        for proc in [self.nginx, *self.instances, self.memcached]:
            if proc is not None:
                proc.stop()
        for i in range(self.instance_count):
            self.socket_path(i).unlink(missing_ok=True)  # gunicorn leaves it when it was killed

    def __enter__(self) -> Stack:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _hints(stack: Stack) -> str:
    """URLs to try: the gallery first (when on), then the README's three when the bundled samples are served, else
    the preset list."""
    url = stack.url
    gallery = f"open: {url}/   (the gallery: every original at every preset)\n" if stack.config.gallery else ""
    if stack.config.origins != (f"file://{SAMPLES}",) or not {"small", "thumb"} <= set(stack.config.presets):
        return f"{gallery}presets: {url}/presets.json"
    return (
        f"{gallery}try: curl -sI {url}/small/storm.jpg   (twice: X-Cache-Status MISS, then HIT)\n"
        f"     {url}/thumb/wine-exif-orientation-6.jpg   (150x150, upright: stored sideways with EXIF orientation)\n"
        f"     {url}/presets.json   (every preset)"
    )


def _split(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


class _Interrupted(Exception):
    """SIGTERM or SIGINT arrived: unwind to the clean-up, whatever the main thread was doing."""


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Clean-up must not be interrupted in turn: later signals are ignored.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise _Interrupted(signal.Signals(signum).name)


def main(argv: Sequence[str] | None = None, prog: str = "python -m service.launcher") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--host",
        default=os.environ.get("PHIZER_HOST", "127.0.0.1"),
        help="address nginx listens on ($PHIZER_HOST, default 127.0.0.1)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("PHIZER_PORT", "8080")),
        help="nginx port ($PHIZER_PORT, default 8080)",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=int(os.environ.get("PHIZER_INSTANCES", "0")) or None,
        help="app instances ($PHIZER_INSTANCES, default one per CPU core)",
    )
    parser.add_argument(
        "--state-dir",
        default=os.environ.get("PHIZER_STATE_DIR", str(DEFAULT_STATE_DIR)),
        help="runtime files: sockets, pids, logs, cache ($PHIZER_STATE_DIR, default ./state)",
    )
    parser.add_argument(
        "--stacks",
        type=int,
        default=1,
        help="start this many stacks (ports PORT, PORT+1, ...) sharing the first one's memcached,"
        " as separate hosts would",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="phizer: %(message)s")

    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)
    stacks: list[Stack] = []
    try:
        for n in range(args.stacks):
            state = Path(args.state_dir) / (f"stack-{n + 1}" if n else "")
            memcached = stacks[0].memcached_servers if stacks else None
            stacks.append(Stack(state, args.port + n, args.instances, args.host, memcached))
            stacks[-1].start()
        for stack in stacks:
            print(
                f"phizer is up at {stack.url}/  ({stack.instance_count} instances, memcached "
                f"{','.join(stack.memcached_servers) or 'off'}, state in {stack.state_dir})"
            )
        print(_hints(stacks[0]), "Ctrl-C stops everything.", sep="\n", flush=True)
        while not any(stack.failure for stack in stacks):
            time.sleep(0.5)
        log.error("stopping: %s", next(stack.failure for stack in stacks if stack.failure))
        return 1
    except _Interrupted as exc:
        log.info("%s: stopping", exc)
        return 0
    finally:
        for stack in reversed(stacks):
            stack.stop()


if __name__ == "__main__":
    sys.exit(main())
