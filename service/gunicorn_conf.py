"""gunicorn settings for one phizer instance: one gevent worker, one core.

nginx hashes each original onto one instance, so an instance is a single process: several workers would
split one original's requests again. Bind address comes from the command line (``--bind``), one unix
socket or port per instance. No ``preload_app``: boto3 and pymemcache clients must be created after
gevent has monkey-patched the worker (see ../shared/NOTES.md), which the app does lazily.

Memory ceiling: the worker is replaced before it grows past a size, by two triggers that both hand over the graceful
way, without a pause in service:

- a request count (PHIZER_MAX_REQUESTS, default 5000; 0 disables) plus up to PHIZER_MAX_REQUESTS_JITTER
  (default a tenth of it), counted in ``post_request``: a periodic fresh start that needs no measurement. It bounds
  what grows slowly without ever looking big at one moment (heap fragmentation in the malloc arenas, caches of the
  libraries); the jitter keeps a host's instances, which nginx feeds about equally, from recycling together.
- an RSS check (``pre_request`` below; PHIZER_MAX_RSS_MB, default 1024; 0 disables): a request count is blind to
  size, and a burst of large originals can push a worker past any ceiling long before its N-th request, while a
  quiet worker that stays small would be recycled for nothing. The check reads /proc/self/statm (a few
  microseconds) before each request.

The hand-over (``_hand_over``): the worker asks its master for one more worker (SIGTTIN) and goes on serving; the
new worker, once its app is loaded, asks the master for one fewer (SIGTTOU, in ``post_worker_init``), and the master
stops its oldest worker (with one worker per instance, the one that asked) gracefully (SIGTERM: it stops accepting,
finishes the requests it holds, up to ``graceful_timeout``, and exits) while the new one already accepts on the same
listening socket. gunicorn's own recycle (its ``max_requests``, off here) starts the new worker only after the old
one has exited: each recycle held the instance's misses in the socket's backlog for the old worker's last requests
plus the new one's start: 1.5 s at p99 with 8 concurrent misses on 2 cores, against 0.14-0.19 s with the hand-over
(``python -m bench.recycle``: bench/results/recycle.md; make bench's page mix saw 1-1.2 s p99 spikes in the rounds
with a recycle).

Neither can stop one request that alone needs too much: that is the hard ceiling's job (systemd ``MemoryMax`` in
the Ansible role, set above PHIZER_MAX_RSS_MB so the graceful recycle comes first; the kernel kills the instance
at MemoryMax, failing its requests in flight, and systemd restarts it).
"""

import contextlib
import gc
import os
import random
import signal
import socket
import sys
import weakref
from pathlib import Path
from typing import Any

import gunicorn.util

from service.memory import IdleTrim, rss_bytes, tune_malloc

worker_class = "gevent"
workers = 1
worker_connections = int(os.environ.get("PHIZER_WORKER_CONNECTIONS", "1000"))
preload_app = False
timeout = int(os.environ.get("PHIZER_WORKER_TIMEOUT", "60"))  # a worker stuck in CPU this long is restarted
graceful_timeout = 10
keepalive = 75  # nginx keeps upstream connections open; do not close them under it
# No request-line limit of gunicorn's own: nginx already bounds it (8 KiB), but re-escapes the URI it forwards (up
# to 3x longer), and gunicorn's refusal would be an HTML page. An over-long key gets the app's one-line 400.
limit_request_line = 0
# gunicorn's own refusals (a request nginx would never forward, sent to an instance directly): one plain line like
# nginx's and the app's, with the same status gunicorn chose, never its HTML page quoting the request back.
PLAIN_REFUSALS = {
    400: "bad request: malformed URL or headers\n",
    414: "request line too long\n",
    431: "request header fields too large\n",
    501: "bad request: unsupported transfer coding\n",
}


def write_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """Replaces ``gunicorn.util.write_error`` (which its workers call for every request they refuse themselves);
    ``mesg``, gunicorn's detail quoting the request, is logged by gunicorn already and never sent."""
    text = PLAIN_REFUSALS.get(status_int, "bad request\n" if status_int < 500 else "internal error\n").encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: text/plain; charset=utf-8\r\n"
        f"Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nContent-Length: {len(text)}\r\n\r\n"
    )
    gunicorn.util.write_nonblock(sock, head.encode("latin-1") + text)


gunicorn.util.write_error = write_error  # loaded by the master before it forks: every worker answers so

# Several instances per host: each must have its own control socket, or they fight over one.
control_socket_disable = True
accesslog = None  # nginx logs every request; the app logs only errors
logger_class = "service.logs.GunicornLogger"  # no access log, even with the logconfig_dict below
errorlog = "-"
loglevel = os.environ.get("PHIZER_LOG_LEVEL", "info")
# gunicorn's own lines as JSON, like the app's (service/logs.py): one format for an operator's log pipeline.
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"json": {"()": "service.logs.JsonFormatter"}},
    "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
    "loggers": {"gunicorn.error": {"level": loglevel.upper(), "handlers": ["stderr"], "propagate": False}},
    "root": {"level": "WARNING", "handlers": ["stderr"]},  # the worker's own (service/logs.py) replaces it
}
proc_name = "phizer-" + os.environ.get("PHIZER_INSTANCE", "app")
max_requests = 0  # gunicorn's own: it would start the new worker only after the old one exits (see above)
MAX_REQUESTS = int(os.environ.get("PHIZER_MAX_REQUESTS", "5000"))
MAX_REQUESTS_JITTER = int(os.environ.get("PHIZER_MAX_REQUESTS_JITTER", str(MAX_REQUESTS // 10)))
MAX_RSS_BYTES = int(os.environ.get("PHIZER_MAX_RSS_MB", "1024")) * 1024 * 1024


def post_worker_init(worker: Any) -> None:
    """The app is loaded: its objects leave the garbage collector's way, this worker replaces any it was started
    for, and it picks its own request limit.

    ``gc.freeze()`` moves every object alive now (modules, routes, Pillow's plugins, the clients: about 46,000) to a
    permanent generation, so a full collection scans only what requests made since. Measured on a 2-core host at
    1,000 requests/s: two full collections of 20-23 ms in 10 s, each stalling the event loop (and every request of the
    instance), before; six of 0.5-1.2 ms after.

    When the master runs more workers than configured, this one was started by a hand-over (``_hand_over``):
    SIGTTOU asks the master for one worker fewer, and it stops the oldest one, the worker being replaced. SIGTERM
    from then on also lets go of the worker's idle kept-alive connections (``_let_go``).
    """
    gc.freeze()
    worker.log.info("App loaded: %d objects frozen out of the garbage collector's way", gc.get_freeze_count())
    worker.phizer_limit = MAX_REQUESTS + random.randint(0, MAX_REQUESTS_JITTER) if MAX_REQUESTS > 0 else 0
    worker.phizer_handing_over = False
    stop = signal.getsignal(signal.SIGTERM)  # gunicorn's handle_exit: stop accepting, finish, exit

    def handle_term(signum: int, frame: Any) -> None:
        stop(signum, frame)
        _let_go()

    signal.signal(signal.SIGTERM, handle_term)
    signal.siginterrupt(signal.SIGTERM, False)  # as gunicorn's: a SIGTERM never interrupts a request's system call
    if _workers_of(worker.ppid) > worker.cfg.workers:
        os.kill(worker.ppid, signal.SIGTTOU)


def _workers_of(master: int) -> int:
    """How many workers (children) the master has now; one more than configured while a worker is being replaced."""
    try:
        return len(Path(f"/proc/{master}/task/{master}/children").read_text().split())
    except OSError:  # no such file (a kernel without it): ask anyway, the master ignores it with a single worker
        return sys.maxsize


def _hand_over(worker: Any, why: str) -> None:
    """Ask the master for a new worker to replace this one, once; this one serves on until the master stops it."""
    if worker.phizer_handing_over or not worker.alive:
        return
    worker.phizer_handing_over = True
    worker.log.info("Recycling worker: %s; a new worker is starting to replace it", why)
    os.kill(worker.ppid, signal.SIGTTIN)


def pre_request(worker: Any, req: Any) -> None:
    """Hand over once the worker's RSS passed PHIZER_MAX_RSS_MB (see the module's docstring)."""
    worker.log.debug("%s %s", req.method, req.path)  # gunicorn's default pre_request, which this replaces
    sock = _connection(req)
    if sock is not None:
        _idle_connections.discard(sock)  # busy again (see post_request)
    if MAX_RSS_BYTES > 0:
        rss = rss_bytes()
        if rss > MAX_RSS_BYTES:
            _hand_over(worker, f"RSS {rss >> 20} MiB > PHIZER_MAX_RSS_MB={MAX_RSS_BYTES >> 20}")


def post_request(worker: Any, req: Any, environ: Any, resp: Any) -> None:
    """Count the request against the worker's limit (``_hand_over``); once the worker is going away (replaced, or
    the instance stopping), let go of its idle kept-alive connections.

    nginx keeps idle connections to the instance (upstream ``keepalive``). A worker that stopped accepting waits
    for every connection it holds, up to ``graceful_timeout``, before it exits, and idle ones never end by
    themselves: the worker lingered the whole 10 s (with gunicorn's own recycle, which starts the fresh worker only
    after the old one exited, every recycle held new connections in the listening socket's backlog that long), and
    gunicorn finally wrote an unsolicited 500 on each idle connection it killed. Shutting their reading side ends
    each waiting handler at once (gunicorn closes the connection quietly, nginx drops it from its cache), so the
    worker exits as soon as the requests it is serving are done. A request nginx was sending at that very moment
    gets a connection error on a cached connection, which nginx retries on another connection
    (``proxy_next_upstream error``).
    """
    sock = _connection(req)
    if worker.alive:
        if 0 < worker.phizer_limit <= worker.nr:
            _hand_over(worker, f"{worker.nr} requests served (PHIZER_MAX_REQUESTS)")
        if sock is not None and resp is not None and not resp.should_close():
            _idle_connections.add(sock)  # waits for its next request; pre_request takes it out again
        return
    _let_go(sock)


def _let_go(*also: socket.socket | None) -> None:
    """End the handlers waiting on idle kept-alive connections (and on ``also``): see ``post_request``."""
    for idle in [*_idle_connections, *also]:
        if idle is not None:
            with contextlib.suppress(OSError):
                # The kernel socket under gevent's: gevent's own shutdown() would throw EBADF into the waiting
                # handler (logged as an error); the kernel's makes its read return end-of-file, a quiet close.
                getattr(idle, "_sock", idle).shutdown(socket.SHUT_RD)
    _idle_connections.clear()


_idle_connections: weakref.WeakSet[socket.socket] = weakref.WeakSet()  # gone when gunicorn drops the socket


def _connection(req: Any) -> socket.socket | None:
    """The client socket a gunicorn (27) request is read from, or None if gunicorn keeps it elsewhere."""
    return getattr(getattr(req, "unreader", None), "sock", None)


def child_exit(server: Any, worker: Any) -> None:
    """A worker is gone (recycled, killed): drop its live gauges from the host's /metrics (its counters stay)."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)


def post_fork(server: object, worker: object) -> None:
    """In each worker, before it loads the app: malloc tuned for threaded renders, and its free memory given back
    whenever it goes idle (service/memory.py)."""
    tune_malloc()
    IdleTrim().start()
