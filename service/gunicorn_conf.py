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
# Several instances per host: each must have its own control socket, or they fight over one.
control_socket_disable = True
accesslog = None  # nginx logs every request; the app logs only errors
errorlog = "-"
loglevel = os.environ.get("PHIZER_LOG_LEVEL", "info")
proc_name = "phizer-" + os.environ.get("PHIZER_INSTANCE", "app")
