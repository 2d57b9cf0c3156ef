"""Real servers for tests, all on 127.0.0.1: moto's S3, memcached, gunicorn instances, and a counting HTTP proxy.

The proxy sits in front of an origin (moto, or nothing: it can serve files itself) so tests can count how many
GETs reach the origin and make every GET slow, which is how the single-flight, cache and overlap claims are
proven against real network I/O.
"""

from __future__ import annotations

import http.client
import http.server
import os
import re
import shutil
import sys
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
import yaml

from service.procs import Process, free_port, http_ready, tcp_ready

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
SAMPLE = re.compile(r"^(?P<name>[a-z_]+)(?:\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def metrics(url: str) -> Samples:
    """A stack's ``/metrics`` through its nginx (``url``), parsed: (name, labels) -> value."""
    response = requests.get(url + "/metrics", timeout=10)
    assert response.status_code == 200 and response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for line in response.text.splitlines():
        match = SAMPLE.match(line)
        if match:
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match["labels"] or ""))
            samples[(match["name"], labels)] = float(match["value"])
    return samples


def metric(samples: Samples, name: str, **labels: str) -> float:
    """One sample's value (0 when absent: a labelled counter appears on its first increment)."""
    return samples.get((name, frozenset(labels.items())), 0.0)


def _find_corpus() -> Path:
    """``$PHIZER_CORPUS``, else ``../shared/corpus`` beside the checkout, else this workplace's shared folder."""
    if os.environ.get("PHIZER_CORPUS"):
        return Path(os.environ["PHIZER_CORPUS"])
    candidates = [REPO.parent / "shared" / "corpus", Path("/work/shared/corpus")]
    return next((path for path in candidates if (path / "MANIFEST.tsv").exists()), candidates[0])


CORPUS = _find_corpus()
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def memcached_argv(port: int, memory_mb: int = 64) -> list[str]:
    """memcached on loopback only; ``-u root`` because tests may run as root (memcached refuses otherwise)."""
    argv = [shutil.which("memcached") or "/usr/bin/memcached", "-l", "127.0.0.1", "-p", str(port), "-U", "0"]
    argv += ["-m", str(memory_mb)]
    if os.geteuid() == 0:
        argv += ["-u", "root"]
    return argv


@contextmanager
def memcached(log_dir: Path) -> Iterator[tuple[Process, str]]:
    """A real memcached; yields the process and its ``host:port``."""
    port = free_port()
    proc = Process("memcached", memcached_argv(port), log_dir / f"memcached-{port}.log")
    try:
        proc.wait_ready(tcp_ready("127.0.0.1", port))
        yield proc, f"127.0.0.1:{port}"
    finally:
        proc.stop()


@contextmanager
def moto_s3(log_dir: Path, tls: tuple[Path, Path] | None = None) -> Iterator[str]:
    """moto's standalone S3 server, over HTTP or (given a cert and key) HTTPS; yields its endpoint URL."""
    port = free_port()
    argv = [str(VENV_BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)]
    if tls:
        argv += ["--ssl-cert", str(tls[0]), "--ssl-key", str(tls[1])]
    proc = Process("moto", argv, log_dir / f"moto-{port}.log")
    try:
        proc.wait_ready(tcp_ready("127.0.0.1", port))
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    finally:
        proc.stop()


def pid_of(words: list[str]) -> int:
    """The pid of the process whose command line holds all of ``words`` (one the caller started, e.g. moto_s3's
    server: it yields only its endpoint)."""
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if all(any(word in arg for arg in argv) for word in words):
            return int(cmdline.parent.name)
    raise AssertionError(f"no process with {words}")


def s3_client(endpoint: str, verify: str | None = None) -> Any:
    """A boto3 client for test set-up (the service makes its own)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        verify=verify,
        **{k.lower(): v for k, v in AWS_ENV.items() if "KEY" in k},
        region_name=AWS_ENV["AWS_DEFAULT_REGION"],
    )


class QuietServer(http.server.ThreadingHTTPServer):
    """Clients that hang up (timeouts under test) are expected here, not worth a traceback."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass


class CountingProxy:
    """An HTTP server counting GETs per path; it forwards to ``upstream`` or serves ``files`` itself.

    ``delay`` (seconds, changeable at any time) is slept before every GET is answered, like a slow origin;
    ``status`` forces an error answer (e.g. 500) instead, with ``error_body`` and ``error_headers``; while
    ``stall`` is an unset Event, GETs wait for it (up to 30 s) before being answered, like a hung origin.
    """

    def __init__(self, upstream: str | None = None, files: dict[str, bytes] | None = None) -> None:
        self.upstream = urllib.parse.urlsplit(upstream) if upstream else None
        self.files = files if files is not None else {}
        self.gets: Counter[str] = Counter()
        self.delay = 0.0
        self.status: int | None = None
        self.error_body = b"forced error\n"
        self.error_headers: dict[str, str] = {}
        self.stall: threading.Event | None = None
        self._lock = threading.Lock()
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._count(self.path)
                time.sleep(proxy.delay)
                stall = proxy.stall
                if stall is not None:
                    stall.wait(30)  # then answer, late: a client that timed out has long given up
                if proxy.status is not None:
                    self._answer(proxy.status, proxy.error_body, proxy.error_headers)
                elif proxy.upstream is None:
                    body = proxy.files.get(urllib.parse.unquote(urllib.parse.urlsplit(self.path).path))
                    self._answer(404, b"missing\n", {}) if body is None else self._answer(200, body, {})
                else:
                    self._forward()

            def _forward(self) -> None:
                assert proxy.upstream is not None
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                headers["Host"] = proxy.upstream.netloc
                conn.request("GET", self.path, headers=headers)
                upstream = conn.getresponse()
                body = upstream.read()
                keep = {
                    k: v
                    for k, v in upstream.getheaders()
                    if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date")
                }
                conn.close()
                self._answer(upstream.status, body, keep)

            def _answer(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = QuietServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _count(self, path: str) -> None:
        with self._lock:
            self.gets[urllib.parse.unquote(urllib.parse.urlsplit(path).path)] += 1

    def total(self) -> int:
        with self._lock:
            return sum(self.gets.values())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def instance(
    tmp: Path,
    origins: list[str],
    memcached_servers: list[str] | None = None,
    config: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
    name: str = "test",
) -> Iterator[tuple[Process, str]]:
    """One real gunicorn+gevent phizer instance on a free port; yields the process and its base URL.

    ``config`` is merged over the default config (e.g. {"limits": {...}}). HTTP origins may be private (every test
    server is on 127.0.0.1); ``env={"PHIZER_ALLOW_PRIVATE_ORIGINS": "0"}`` turns the guard back on.
    """
    raw = yaml.safe_load((REPO / "service" / "default_config.yaml").read_text())
    raw.update(config or {})
    tmp.mkdir(parents=True, exist_ok=True)
    config_path = tmp / f"config-{name}.yaml"
    config_path.write_text(yaml.safe_dump(raw))
    port = free_port()
    proc = Process(
        f"gunicorn-{name}",
        [
            str(VENV_BIN / "gunicorn"),
            "-c",
            str(REPO / "service" / "gunicorn_conf.py"),
            "--bind",
            f"127.0.0.1:{port}",
            "service.wsgi:app",
        ],
        tmp / f"gunicorn-{name}-{port}.log",
        env={
            **AWS_ENV,
            "PHIZER_CONFIG": str(config_path),
            "PHIZER_ORIGINS": ",".join(origins),
            "PHIZER_MEMCACHED": ",".join(memcached_servers or []),
            "PHIZER_ALLOW_PRIVATE_ORIGINS": "1",
            "PHIZER_INSTANCE": name,
            **(env or {}),
        },
        cwd=REPO,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        proc.wait_ready(http_ready(url + "/healthz"))
        yield proc, url
    finally:
        proc.stop()


def self_signed_cert(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and localhost (and its key), to run an origin over HTTPS that clients can verify."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path
