"""gunicorn settings for one phizer instance: one gevent worker, one core.

nginx hashes each original onto one instance, so an instance is a single process: several workers would
split one original's requests again. Bind address comes from the command line (``--bind``), one unix
socket or port per instance. No ``preload_app``: boto3 and pymemcache clients must be created after
gevent has monkey-patched the worker (see ../shared/NOTES.md), which the app does lazily.
"""

import os

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
# Several instances per host: each must have its own control socket, or they fight over one.
control_socket_disable = True
accesslog = None  # nginx logs every request; the app logs only errors
errorlog = "-"
loglevel = os.environ.get("PHIZER_LOG_LEVEL", "info")
proc_name = "phizer-" + os.environ.get("PHIZER_INSTANCE", "app")


def post_fork(server: object, worker: object) -> None:
    """Keep the worker's memory from creeping up under threaded renders (glibc malloc tuning).

    Renders run on native threads (service/offload.py): glibc gives each thread its own arena, and after large
    frees it raises its mmap threshold up to 32 MiB, so decoded images end up in arenas that never shrink (bench:
    310-370 MB per instance after B2). Two arenas and an 8 MiB threshold send the big image buffers to mmap,
    returned to the system on free (bench: 170-230 MB) for about 8% more CPU per miss (page faults); a 1 MiB
    threshold saved little more memory for about 20% more CPU.
    """
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    m_mmap_threshold, m_arena_max = -3, -8
    libc.mallopt(m_arena_max, 2)
    libc.mallopt(m_mmap_threshold, 8 * 1024 * 1024)
