"""The WSGI entry point gunicorn loads in each worker: ``service.wsgi:app``.

Imported after gevent's monkey-patching (no ``--preload``), before the worker accepts a request: the network
clients (boto3, pymemcache) are created here, by create_app, which TLS under gevent needs (NOTES.md).
"""

import os

from service.app import create_app
from service.config import load_config
from service.logs import configure_logging

configure_logging(os.environ.get("PHIZER_LOG_LEVEL", "INFO"))

app = create_app(load_config(), instance=os.environ.get("PHIZER_INSTANCE", ""))
