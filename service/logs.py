"""The service's one log format: one JSON object per line, from the app and from gunicorn itself.

Operators feed these lines to a log pipeline, where a line that is not JSON breaks the parser or is lost. The
app's records carry their ``fields`` (the request line of service/app.py); gunicorn's own records (its master's
"Starting gunicorn" and "Booting worker", a worker's timeout) use the same formatter through
service/gunicorn_conf.py's ``logconfig_dict``. gunicorn's master imports this module before it forks, so it
imports nothing of the service: the app's metrics (service/metrics.py) must only ever be made in a worker.
"""

from __future__ import annotations

import json
import logging

from gunicorn.glogging import Logger


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, the record's ``fields`` (a request's line) or else the logger's name,
    and the message."""

    def format(self, record: logging.LogRecord) -> str:
        line = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname.lower()}
        fields = getattr(record, "fields", None)
        if fields:
            line.update(fields)
        else:  # not a request's line: say who wrote it (gunicorn.error, service.cache, ...)
            line["logger"] = record.name
        if record.msg:
            line["msg"] = record.getMessage()
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level: str = "INFO") -> None:
    """Every log record of the process to stderr (gunicorn's error log) as one JSON line (service/wsgi.py)."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


class GunicornLogger(Logger):
    """gunicorn's own logger (service/gunicorn_conf.py's ``logger_class``) with its access log off.

    nginx logs every request and the app writes its own line, so gunicorn's access log is not configured. But
    gunicorn counts any ``logconfig_dict`` as asking for one: after each response it built the request's log atoms
    (a dict of every request header, response header and environ entry) for a logger that writes nowhere: 64 us per
    request when warm, the largest single entry (16%) of a worker's event-loop samples under sequential misses.
    """

    access_log_enabled = False  # gunicorn's workers ask this before building a request's atoms
