"""Origins one by one (file, HTTP, S3 against real servers) and the chain's first-hit-wins and error rules.

The hostile origins (dripping, redirecting, truncating, lying about checksums) are small scripted HTTP servers on
loopback; botocore talks to one as readily as to S3, since a GetObject answer is just headers and a body.
"""

from __future__ import annotations

import base64
import http.server
import json
import logging
import re
import socket
import ssl
import threading
import time
import urllib.parse
import urllib.request
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest

from service import public_net
from service.config import ConfigError, Limits, parse_config
from service.errors import BadGateway, GatewayTimeout, NotFound, TooLarge
from service.original import Original, parse_focus
from service.origins import (
    FileOrigin,
    HttpOrigin,
    OriginChain,
    OriginFailure,
    OriginTimeout,
    S3Origin,
    make_origin,
)
from tests.support import AWS_ENV, CountingProxy, QuietServer, moto_s3, s3_client, self_signed_cert

Answer = Callable[[http.server.BaseHTTPRequestHandler], None]
PRESETS = {"s": {"width": 1}}


class Scripted:
    """An HTTP(S) server on ``host`` answering each GET by its path's ``Answer`` (404 if none); it counts connections
    and records each request's path and Host header."""

    def __init__(
        self, routes: dict[str, Answer], host: str = "127.0.0.1", port: int = 0, tls: tuple[Path, Path] | None = None
    ) -> None:
        self.connections = 0
        self.paths: list[str] = []
        self.hosts: list[str | None] = []
        scripted = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def setup(self) -> None:
                super().setup()
                scripted.connections += 1

            def do_GET(self) -> None:
                path = urllib.parse.urlsplit(self.path).path
                scripted.paths.append(path)
                scripted.hosts.append(self.headers["Host"])
                routes.get(path, send(404, b"missing\n"))(self)

        self.server = QuietServer((host, port), Handler)
        if tls:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve() -> Iterator[Callable[..., Scripted]]:
    """Start Scripted servers for one test (same arguments); all are closed after it."""
    started: list[Scripted] = []

    def start(*args: Any, **kwargs: Any) -> Scripted:
        started.append(Scripted(*args, **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.close()


def send(status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> Answer:
    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        for name, value in (headers or {}).items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)

    return answer


def drip(handler: http.server.BaseHTTPRequestHandler) -> None:
    """Promise a megabyte, then send a byte every 0.2 s: each socket read is quick, the body never ends."""
    handler.send_response(200)
    handler.send_header("Content-Length", str(1_000_000))
    handler.end_headers()
    for _ in range(100):  # 20 s, far beyond any deadline under test; the client hanging up ends it sooner
        handler.wfile.write(b"x")
        time.sleep(0.2)


def truncated(handler: http.server.BaseHTTPRequestHandler) -> None:
    """Promise 10 bytes, send 5, hang up."""
    handler.send_response(200)
    handler.send_header("Content-Length", "10")
    handler.end_headers()
    handler.wfile.write(b"12345")
    handler.close_connection = True


def big_then_watch(closed: threading.Event, chunked: bool) -> Answer:
    """Send 320 KiB of a bigger body (declared, or chunked without a length), then set ``closed`` once the client
    has hung up; a client that keeps the connection open leaves it unset."""

    def answer(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header(*(("Transfer-Encoding", "chunked") if chunked else ("Content-Length", str(10**7))))
        handler.end_headers()
        piece = b"x" * 65536
        try:
            for _ in range(5):  # more than one 256 KiB read
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            handler.connection.settimeout(5)
            if handler.connection.recv(1):
                return
        except (BrokenPipeError, ConnectionResetError):
            pass
        except TimeoutError:
            return
        closed.set()

    return answer


def origin_of(kind: str, server: Scripted, limits: Limits) -> HttpOrigin | S3Origin:
    """The server as an HTTP origin (keys at /), or as the S3 endpoint of bucket ``bucket`` (see s3_at)."""
    return HttpOrigin(server.url, limits, allow_private=True) if kind == "http" else S3Origin("s3://bucket", limits, 1)


def s3_at(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point boto3's chain at a scripted server standing in for S3."""
    for name, value in {**AWS_ENV, "AWS_ENDPOINT_URL": url}.items():
        monkeypatch.setenv(name, value)


def test_file_origin_reads_and_never_escapes(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (root / "a" / "b.jpg").write_bytes(b"image")
    (tmp_path / "secret").write_bytes(b"secret")
    (root / "link").symlink_to(tmp_path / "secret")
    origin = FileOrigin(f"file://{root}", Limits())
    assert origin.fetch("a/b.jpg") == Original.from_bytes(b"image")
    assert origin.fetch("a/missing.jpg") is None
    assert origin.fetch("a") is None  # a folder is not an original
    assert origin.fetch("link") is None  # a symlink out of the root is not followed out
    with pytest.raises(TooLarge):
        FileOrigin(f"file://{root}", Limits(max_original_bytes=3)).fetch("a/b.jpg")


def test_http_origin_statuses_and_timeouts() -> None:
    server = CountingProxy(files={"/up/new photo.jpg": b"fresh"})
    try:
        origin = HttpOrigin(server.url + "/up", Limits(origin_read_timeout=0.5), allow_private=True)
        assert origin.fetch("new photo.jpg") == Original.from_bytes(b"fresh")
        assert origin.fetch("other.jpg") is None
        server.status = 500
        with pytest.raises(OriginFailure):
            origin.fetch("new photo.jpg")
        server.status, server.delay = None, 1.5
        with pytest.raises(OriginTimeout):
            origin.fetch("new photo.jpg")
    finally:
        server.close()
    with pytest.raises(OriginFailure) as failure:  # nothing listens there any more: a failure, not a timeout
        HttpOrigin(server.url, Limits(), allow_private=True).fetch("x.jpg")
    assert not isinstance(failure.value, OriginTimeout)


def test_readiness_probe_waits_readiness_timeout() -> None:
    """/readyz's probe of a hung origin (connects, never answers) gives up after limits.readiness_timeout (default
    1 s), not after a read timeout."""
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # connections complete in the backlog; nothing ever reads or answers them
        url = f"http://127.0.0.1:{hung.getsockname()[1]}/files"
        origin = HttpOrigin(url, Limits(readiness_timeout=0.2, origin_read_timeout=30), allow_private=True)
        started = time.monotonic()
        with pytest.raises(OriginFailure):
            origin.probe()
        assert time.monotonic() - started < 0.9  # the 1 s default would not have given up yet


def test_connections_are_kept_after_whole_bodies(
    serve: Callable[..., Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Reading as the socket delivers still ends each response cleanly: the next GET reuses the connection."""
    server = serve({"/a.jpg": send(200, b"a" * 300_000), "/bucket/a.jpg": send(200, b"s3" * 1000)})
    http_origin = HttpOrigin(server.url, Limits(), allow_private=True)
    whole = Original.from_bytes(b"a" * 300_000)
    assert [http_origin.fetch("a.jpg"), http_origin.fetch("gone.jpg"), http_origin.fetch("a.jpg")] == [
        whole,
        None,
        whole,
    ]
    assert server.connections == 1
    s3_at(server.url, monkeypatch)
    s3_origin = S3Origin("s3://bucket", Limits(), 1)
    assert s3_origin.fetch("a.jpg") == s3_origin.fetch("a.jpg") == Original.from_bytes(b"s3" * 1000)
    assert server.connections == 2


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_dripping_body_ends_at_the_deadline(
    kind: str, serve: Callable[..., Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte every 0.2 s never trips the 0.5 s read timeout; the 1 s deadline must still end the download."""
    server = serve({"/a.jpg": drip, "/bucket/a.jpg": drip})
    s3_at(server.url, monkeypatch)
    origin = origin_of(kind, server, Limits(origin_total_timeout=1.0, origin_read_timeout=0.5))
    started = time.monotonic()
    with pytest.raises(OriginTimeout, match="not received in time"):
        origin.fetch("a.jpg")
    assert 1.0 <= time.monotonic() - started < 1.5


@pytest.mark.parametrize("kind", ["http", "s3"])
def test_truncated_body_is_a_failure(
    kind: str, serve: Callable[..., Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Short reads must not pass a truncated original off as a whole one (urllib3's or botocore's length check)."""
    server = serve({"/a.jpg": truncated, "/bucket/a.jpg": truncated})
    s3_at(server.url, monkeypatch)
    origin = origin_of(kind, server, Limits())
    with pytest.raises(OriginFailure):
        origin.fetch("a.jpg")


def test_s3_checksum_is_still_checked(serve: Callable[..., Scripted], monkeypatch: pytest.MonkeyPatch) -> None:
    """Reads that take what the socket delivers still go through botocore's checksum check."""
    crc = base64.b64encode(zlib.crc32(b"abc").to_bytes(4, "big")).decode()
    server = serve(
        {
            "/bucket/right.jpg": send(200, b"abc", {"x-amz-checksum-crc32": crc}),
            "/bucket/wrong.jpg": send(200, b"abd", {"x-amz-checksum-crc32": crc}),
        }
    )
    s3_at(server.url, monkeypatch)
    origin = S3Origin("s3://bucket", Limits(), 1)
    assert origin.fetch("right.jpg") == Original.from_bytes(b"abc")
    with pytest.raises(OriginFailure, match="checksum"):
        origin.fetch("wrong.jpg")


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "streamed"])
def test_s3_body_is_closed_when_too_large(
    chunked: bool, serve: Callable[..., Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the size limit, by its Content-Length or while streaming, the body's connection is closed at once (the
    exception kept here still references the response: only an explicit close hangs up)."""
    closed = threading.Event()
    server = serve({"/bucket/big.jpg": big_then_watch(closed, chunked)})
    s3_at(server.url, monkeypatch)
    with pytest.raises(TooLarge):
        S3Origin("s3://bucket", Limits(max_original_bytes=1000), 1).fetch("big.jpg")
    assert closed.wait(3)


def test_s3_origin_with_prefix(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="origin-unit")
    client.put_object(Bucket="origin-unit", Key="pre/x/y.jpg", Body=b"s3 bytes")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_endpoint)
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    config = parse_config({"origins": ["s3://origin-unit/pre"], "presets": {"s": {"width": 1}}}, {})
    origin = make_origin(config.origins[0], config)
    assert origin.fetch("x/y.jpg") == Original.from_bytes(b"s3 bytes")
    assert origin.fetch("x/none.jpg") is None
    with pytest.raises(OriginFailure):
        make_origin("s3://no-such-bucket", config).fetch("x/y.jpg")


def test_focus_comes_with_the_same_response(
    s3_endpoint: str, serve: Callable[..., Scripted], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """S3 user metadata ``focus`` (x-amz-meta-focus), or the same header from an HTTP origin, is the original's
    focal point; a malformed one is logged and ignored, never an error."""
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="focus-unit")
    client.put_object(Bucket="focus-unit", Key="f.jpg", Body=b"f", Metadata={"focus": "0.3,0.7"})
    client.put_object(Bucket="focus-unit", Key="bad.jpg", Body=b"b", Metadata={"focus": "north"})
    client.put_object(Bucket="focus-unit", Key="none.jpg", Body=b"n")
    for name, value in {**AWS_ENV, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    s3 = S3Origin("s3://focus-unit", Limits(), 1)
    assert s3.fetch("f.jpg") == Original.from_bytes(b"f", focus=(0.3, 0.7))
    assert s3.fetch("none.jpg") == Original.from_bytes(b"n")
    with caplog.at_level(logging.WARNING, logger="service.original"):
        assert s3.fetch("bad.jpg") == Original.from_bytes(b"b")
    assert "ignoring malformed focus 'north' of 'bad.jpg'" in caplog.text
    server = serve({"/a.jpg": send(200, b"a", {"X-Amz-Meta-Focus": " 1, .25 "}), "/b.jpg": send(200, b"b")})
    http_origin = HttpOrigin(server.url, Limits(), allow_private=True)
    assert http_origin.fetch("a.jpg") == Original.from_bytes(b"a", focus=(1.0, 0.25))
    assert http_origin.fetch("b.jpg") == Original.from_bytes(b"b")


@pytest.mark.parametrize("value", ["", "0.5", "0.5,0.5,0.5", "1.5,0", "-0.1,0.5", "nan,0", "1e-3,0", "inf,1", ". , ."])
def test_malformed_focus_is_ignored(value: str) -> None:
    assert parse_focus(value) is None


def test_s3_forbidden_can_mean_missing(logs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``?forbidden=missing`` reads 403 AccessDenied as "not here"; by default it stays a failure (502).

    Real S3 answers AccessDenied for a missing key when the reader lacks s3:ListBucket. moto (5.2) does not: with
    IAM enforced it checks s3:GetObject against the key's ARN and then answers 404 NoSuchKey, ListBucket or not.
    So the 403 comes from a policy granting GetObject under ``originals/public/`` only: a key outside it is the
    same AccessDenied answer a missing key gets from S3.
    """
    with moto_s3(logs) as endpoint:  # its own moto: IAM is enforced below, which the session's must not be
        for name, value in {**AWS_ENV, "AWS_ENDPOINT_URL": endpoint}.items():
            monkeypatch.setenv(name, value)
        s3_client(endpoint).create_bucket(Bucket="iam-unit")
        s3_client(endpoint).put_object(Bucket="iam-unit", Key="originals/public/a.jpg", Body=b"granted")
        iam = boto3.client("iam")
        iam.create_user(UserName="reader")
        policy = {"Effect": "Allow", "Action": "s3:GetObject", "Resource": "arn:aws:s3:::iam-unit/originals/public/*"}
        iam.put_user_policy(
            UserName="reader",
            PolicyName="get-public",
            PolicyDocument=json.dumps({"Version": "2012-10-17", "Statement": [policy]}),
        )
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        # From now on every request is authenticated and authorised (moto's own switch, as its decorator uses).
        switch = urllib.request.Request(f"{endpoint}/moto-api/reset-auth", b"0", {"Content-Type": "text/plain"})
        urllib.request.urlopen(switch).close()
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        config = parse_config({"origins": ["s3://iam-unit/originals"], "presets": {"s": {"width": 1}}}, {})
        lenient = make_origin("s3://iam-unit/originals?forbidden=missing", config)
        strict = make_origin("s3://iam-unit/originals", config)
        granted = Original.from_bytes(b"granted")
        assert lenient.fetch("public/a.jpg") == strict.fetch("public/a.jpg") == granted  # prefix without query
        assert lenient.fetch("public/none.jpg") is None and strict.fetch("public/none.jpg") is None  # moto's 404
        assert lenient.fetch("private/b.jpg") is None
        with pytest.raises(NotFound):
            OriginChain([lenient]).fetch("private/b.jpg")
        with pytest.raises(OriginFailure, match="AccessDenied"):
            strict.fetch("private/b.jpg")
        with pytest.raises(BadGateway):
            OriginChain([strict]).fetch("private/b.jpg")
        # Bad credentials are a 403 too (SignatureDoesNotMatch), but never read as missing.
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(OriginFailure, match="SignatureDoesNotMatch"):
            make_origin("s3://iam-unit/originals?forbidden=missing", config).fetch("private/b.jpg")


def test_origin_url_options_are_checked() -> None:
    config = parse_config({"origins": ["s3://b"], "presets": PRESETS}, {})
    assert S3Origin("s3://b/pre/fix?forbidden=missing", Limits(), 1).prefix == "pre/fix"
    assert not S3Origin("s3://b?forbidden=failure", Limits(), 1).forbidden_is_missing
    http_origin = HttpOrigin("http://h:81/pre/fix/?redirects=same-host", Limits())
    assert http_origin.base == "http://h:81/pre/fix" and http_origin.follow_redirects  # keys never go after the query
    assert not HttpOrigin("https://h/p?redirects=none", Limits()).follow_redirects
    for kind in ("s3://b/p", "http://h/p", "file:///srv/img"):  # memcached: on unless an origin says off
        assert make_origin(kind, config).memcached and not make_origin(f"{kind}?memcached=off", config).memcached
    for url, expected in (
        ("s3://b/p?forbiden=missing", "forbidden=failure or forbidden=missing"),
        ("s3://b/p?forbidden=maybe", "forbidden=failure or forbidden=missing"),
        ("s3://b/p?forbidden", "forbidden=failure or forbidden=missing"),
        ("s3://b/p?forbidden=missing&forbidden=failure", "forbidden=failure or forbidden=missing"),
        ("s3://b/p?forbidden=missing&x=1", "forbidden=failure or forbidden=missing"),
        ("http://h/p?redirect=none", "redirects=none or redirects=same-host"),
        ("https://h/p?redirects=all", "redirects=none or redirects=same-host"),
        ("http://h/p?redirects=none&redirects=same-host", "redirects=none or redirects=same-host"),
        ("http://h/p?forbidden=missing", "redirects=none or redirects=same-host"),
        ("file:///srv/img?redirects=none", "memcached=on or memcached=off"),
        ("s3://b/p?memcached=0", "memcached=on or memcached=off"),
    ):
        with pytest.raises(ConfigError, match=expected):
            make_origin(url, config)


def test_redirects_are_a_policy(serve: Callable[..., Scripted]) -> None:
    """Not followed by default (502); with ?redirects=same-host, followed on the same scheme, host and port only,
    and only for a few hops. Two servers on two ports are two hosts."""
    other = serve({"/pre/b.jpg": send(200, b"elsewhere")})
    server = serve(
        {
            "/pre/a.jpg": send(302, headers={"Location": "/pre/b.jpg"}),
            "/pre/b.jpg": send(200, b"b"),
            "/pre/away.jpg": send(301, headers={"Location": f"{other.url}/pre/b.jpg"}),
            "/pre/loop.jpg": send(307, headers={"Location": "loop.jpg"}),
        }
    )
    strict = HttpOrigin(server.url + "/pre", Limits(), allow_private=True)
    with pytest.raises(OriginFailure, match=f"HTTP 302 redirect to {server.url}/pre/b.jpg not followed"):
        strict.fetch("a.jpg")
    with pytest.raises(BadGateway):
        OriginChain([strict]).fetch("a.jpg")
    lenient = HttpOrigin(server.url + "/pre?redirects=same-host", Limits(), allow_private=True)
    assert lenient.fetch("a.jpg") == Original.from_bytes(b"b")
    with pytest.raises(OriginFailure, match="another host"):
        lenient.fetch("away.jpg")
    assert other.paths == []
    with pytest.raises(OriginFailure, match="more than 3 redirects"):
        lenient.fetch("loop.jpg")
    assert server.paths.count("/pre/loop.jpg") == 4


@pytest.mark.parametrize(
    ("address", "refusal"),
    [
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"),
        ("172.16.0.1", "private"),
        ("192.168.1.1", "private"),
        ("::ffff:192.168.1.1", "private"),
        ("fd00::1", "private"),
        ("169.254.169.254", "link-local"),
        ("fe80::1%eth0", "link-local"),
        ("224.0.0.1", "multicast"),
        ("ff02::1", "multicast"),
        ("0.0.0.0", "unspecified"),
        ("::", "unspecified"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "not globally routable"),
        ("93.184.215.14", None),
        ("::ffff:93.184.215.14", None),
        ("2606:4700:4700::1111", None),
    ],
)
def test_address_refusal(address: str, refusal: str | None) -> None:
    assert public_net.address_refusal(address) == refusal


def test_private_addresses_are_refused_unless_allowed(serve: Callable[..., Scripted]) -> None:
    """Checked on the address connected to: a name (localhost) or an IPv4-mapped IPv6 address does not get round it.
    A refusal is a failure (502) naming the address, and nothing reaches the server."""
    server = serve({"/a.jpg": send(200, b"a")})
    guarded = parse_config({"origins": ["s3://b"], "presets": PRESETS}, {})
    for host, refused in (
        ("127.0.0.1", "127.0.0.1 (loopback)"),
        ("localhost", "127.0.0.1 (loopback)"),
        ("[::ffff:127.0.0.1]", "::ffff:127.0.0.1 (loopback)"),
    ):
        with pytest.raises(OriginFailure, match=rf"refused to connect to .*{re.escape(refused)}") as failure:
            make_origin(f"http://{host}:{server.port}", guarded).fetch("a.jpg")
        assert not isinstance(failure.value, OriginTimeout)
    assert server.connections == 0
    allowed = parse_config({"origins": ["s3://b"], "presets": PRESETS, "allow_private_origins": True}, {})
    for host in ("127.0.0.1", "localhost"):
        assert make_origin(f"http://{host}:{server.port}", allowed).fetch("a.jpg") == Original.from_bytes(b"a")


def test_private_origins_switch_from_the_environment() -> None:
    base = {"origins": ["http://upload:8000"], "presets": PRESETS}
    assert not parse_config(base, {}).allow_private_origins
    assert parse_config(base, {"PHIZER_ALLOW_PRIVATE_ORIGINS": "1"}).allow_private_origins
    overridden = parse_config({**base, "allow_private_origins": True}, {"PHIZER_ALLOW_PRIVATE_ORIGINS": "false"})
    assert not overridden.allow_private_origins
    with pytest.raises(ConfigError, match="PHIZER_ALLOW_PRIVATE_ORIGINS"):
        parse_config(base, {"PHIZER_ALLOW_PRIVATE_ORIGINS": "maybe"})


def test_a_redirect_cannot_reach_a_private_address(
    serve: Callable[..., Scripted], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every connection is checked, a redirect's too. DNS rebinding, played on loopback: 127.0.0.2 stands in for a
    public address (the test owns no public one) and the origin's name resolves to it first, then to 127.0.0.1
    when the same-host redirect needs a new connection. That one is refused; the server there sees nothing."""
    public = serve({"/a.jpg": send(302, headers={"Location": "/b.jpg", "Connection": "close"})}, host="127.0.0.2")
    private = serve({"/b.jpg": send(200, b"internal")}, port=public.port)
    check = public_net.address_refusal

    def refusal(address: str) -> str | None:
        return None if address == "127.0.0.2" else check(address)

    monkeypatch.setattr(public_net, "address_refusal", refusal)
    resolve, answers = socket.getaddrinfo, iter(["127.0.0.2", "127.0.0.1"])
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda host, *args: resolve(next(answers) if host == "origin.test" else host, *args)
    )
    origin = HttpOrigin(f"http://origin.test:{public.port}?redirects=same-host", Limits())
    with pytest.raises(OriginFailure, match=r"refused to connect to origin.test: 127.0.0.1 \(loopback\)"):
        origin.fetch("a.jpg")
    assert public.paths == ["/a.jpg"] and private.connections == 0


def test_tls_checks_the_host_name_not_the_checked_address(
    serve: Callable[..., Scripted], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guard picks the socket's address; the URL's host name still goes out as Host (and SNI), and the
    certificate is checked against it. Loopback stands in for a public address here. ``origin.test`` resolves to
    127.0.0.1, an address the certificate names, and is refused all the same: the name is what is verified."""
    cert, key = self_signed_cert(tmp_path)  # for 127.0.0.1 and localhost
    server = serve({"/a.jpg": send(200, b"a")}, tls=(cert, key))
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    monkeypatch.setattr(public_net, "address_refusal", lambda address: None)
    resolve = socket.getaddrinfo
    monkeypatch.setattr(
        socket, "getaddrinfo", lambda host, *args: resolve("127.0.0.1" if host == "origin.test" else host, *args)
    )
    assert HttpOrigin(f"https://localhost:{server.port}", Limits()).fetch("a.jpg") == Original.from_bytes(b"a")
    assert server.hosts == [f"localhost:{server.port}"]
    with pytest.raises(OriginFailure, match="Hostname mismatch"):
        HttpOrigin(f"https://origin.test:{server.port}", Limits()).fetch("a.jpg")
    assert server.hosts == [f"localhost:{server.port}"]


class Fake:
    """A stand-in origin for the chain's own rules (a unit test of one module)."""

    def __init__(self, result: bytes | Exception | None) -> None:
        self.url = "fake://"
        self.memcached = True
        self.result = result
        self.calls = 0

    def fetch(self, key: str) -> Original | None:
        self.calls += 1
        if isinstance(self.result, Exception):
            raise self.result
        return None if self.result is None else Original.from_bytes(self.result)


def test_chain_first_hit_wins_in_order() -> None:
    first, second, third = Fake(None), Fake(b"two"), Fake(b"three")
    original = OriginChain([first, second, third]).fetch("k")
    assert original.data == b"two" and len(original.digest) == 32
    assert (first.calls, second.calls, third.calls) == (1, 1, 0)


def test_chain_errors() -> None:
    with pytest.raises(NotFound):
        OriginChain([Fake(None), Fake(None)]).fetch("k")
    # A failure anywhere means the key may exist: never a (cacheable) 404.
    with pytest.raises(BadGateway):
        OriginChain([Fake(OriginFailure("boom")), Fake(None)]).fetch("k")
    with pytest.raises(GatewayTimeout):
        OriginChain([Fake(OriginTimeout("slow")), Fake(OriginTimeout("slow"))]).fetch("k")
    with pytest.raises(BadGateway):
        OriginChain([Fake(OriginTimeout("slow")), Fake(OriginFailure("boom"))]).fetch("k")
    assert OriginChain([Fake(OriginFailure("boom")), Fake(b"ok")]).fetch("k").data == b"ok"
