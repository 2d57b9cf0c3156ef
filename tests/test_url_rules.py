"""The URL rules live in one place (service/presets.py) and nginx applies the very same rules, rendered into its
config from them: checked row by row through real nginx and real instances, with format suffixes on and off.

For every URL of the table, nginx's hash key (``$phizer_key``, which picks the instance) and format token (in its
cache key) are read from its access log and compared with what the app's own parser and negotiation make of the
same URL; the instance that answered must be the one a plain request for the parsed key lands on, and the app's
404 names the same key. Paths nginx normalises (``NORMALISED``) are expected to be read as normalised, by both.
"""

from __future__ import annotations

import http.client
import json
import re
import socket
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from service.launcher import Stack
from service.presets import format_token, parse_path
from service.procs import free_port

CHROME = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
FIREFOX = "image/avif,image/webp,image/png,image/svg+xml,image/*;q=0.8,*/*;q=0.5"
SAFARI = (
    "image/webp,image/avif,image/jxl,image/heic,image/heic-sequence,video/*;q=0.8,image/png,image/svg+xml,"
    "image/*;q=0.8,*/*;q=0.5"
)
ANY = "*/*"
ACCEPTS = (CHROME, FIREFOX, SAFARI, "image/webp,*/*", "IMAGE/AVIF,*/*", ANY)
PRESETS = {
    "small": {"width": 320},  # the global order: AVIF, then WebP
    "thumb": {"width": 150, "height": 150, "fit": "cover"},
    "fixed": {"width": 200, "format": "jpeg"},  # does not negotiate: never a format token
    "webpfirst": {"width": 240, "negotiate": ["webp", "avif"]},  # its own order: AVIF only without WebP
    "noavif": {"width": 260, "negotiate": ["webp"]},  # AVIF turned off
    "never": {"width": 280, "negotiate": []},  # negotiates nothing: one rendition for every Accept
}
CONTENT_TYPES = {"avif": "image/avif", "webp": "image/webp", "": "image/jpeg"}
# Raw request paths as a client sends them (percent-escaped), none of which exists in the origin.
TABLE = [
    "/small/cat.jpg",
    "/small/cat.jpg.webp",
    "/small/x.jpg.webp",  # a top-level key with a suffix
    "/small/.jpg.webp",  # a suffix after a bare extension
    "/small/a/b/Cat.JPG.WebP",  # suffixes in any case, nested keys
    "/small/a/b/cat.jpeg.PNG",
    "/thumb/x.gif.jpeg",
    "/small/photo.webp",  # an extension alone is not a suffix
    "/small/storm_2.5mp.jpg",  # nor is a dot in the name
    "/small/a.b/cat.png",  # nor a dot in a folder
    "/small/a.jpg/b.webp",  # nor an extension on a folder
    "/small/cat%20photo.jpg",  # spaces
    "/small/cat%20photo.jpg.webp",
    "/small/100%25%20real.jpg.png",  # a percent sign in the key
    "/small/caf%C3%A9/%E2%9C%93.jpg",  # UTF-8
    "/small/caf%C3%A9/%E2%9C%93.jpg.gif",
    "/small/a%2Fb.jpg",  # an escaped slash is a slash
    "/small/what%3F.jpg",  # a question mark in the key
    "/small/semi;colon,comma.png.jpg",
    "/fixed/plain.jpg",
    "/fixed/plain.jpg.webp",
    "/small/cat.jpg.avif",
    "/small/a/b/cat.PNG.AVIF",
    "/webpfirst/cat.jpg",
    "/webpfirst/cat.jpg.avif",
    "/noavif/cat.jpg",
    "/noavif/cat.jpg.jpg",
    "/never/cat.jpg",
    "/never/cat.png.webp",
]
# Paths nginx normalises before anything reads them (merged slashes, dot segments, escaped ones too): the instance
# is sent the normalised path (the location's rewrite), so nginx's key and the app's come from the same path.
NORMALISED = {
    "/small//cat.jpg": "/small/cat.jpg",
    "/small/a/./b/../cat.jpg": "/small/a/cat.jpg",
    "/small/a%2F%2Fb.jpg": "/small/a/b.jpg",
    "/small/a/%2e%2e/cat.jpg.webp": "/small/cat.jpg.webp",
    "/small/a//b/Cat.JPG.WebP": "/small/a/b/Cat.JPG.WebP",
}
LOG_FIELDS = re.compile(r' fmt=(?P<fmt>\S*) key="(?P<key>(?:[^"\\]|\\.)*)" ')


def unescape_nginx_log(text: str) -> str:
    """nginx writes bytes outside printable ASCII (and quotes, backslashes) as \\xHH."""
    raw = re.sub(rb"\\x([0-9A-Fa-f]{2})", lambda m: bytes([int(m[1], 16)]), text.encode("latin-1"))
    return raw.decode("utf-8")


@pytest.fixture(scope="module", params=[True, False], ids=["suffix-on", "suffix-off"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, corpus: Path) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("url-rules")
    config = state / "config.yaml"
    folder = state / "originals"
    folder.mkdir()
    (folder / "real.jpg").write_bytes((corpus / "16_storm_720_30k.jpg").read_bytes())  # the only key that exists
    raw = {"origins": [f"file://{folder}"], "presets": PRESETS, "encoding": {"url_format_suffix": request.param}}
    config.write_text(yaml.safe_dump(raw))
    with Stack(state, port=free_port(), instances=3, env={"PHIZER_CONFIG": str(config)}) as started:
        yield started


def fetch(stack: Stack, path: str, accept: str) -> tuple[http.client.HTTPResponse, str, tuple[str, str]]:
    """GET ``path`` verbatim; returns the response, its body and nginx's (format token, key) from its log."""
    before = stack.access_log.stat().st_size if stack.access_log.exists() else 0
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30)
    conn.request("GET", path, headers={"Accept": accept})
    resp = conn.getresponse()
    body = resp.read().decode("utf-8", "replace")
    conn.close()
    for _ in range(50):  # nginx logs just after the last byte is sent
        with stack.access_log.open("rb") as log:
            log.seek(before)
            written = log.read()
        # A long line spans pages, and a read racing nginx's write can see only part of it: wait for the newline.
        lines = [line for line in written.decode("latin-1").splitlines() if line] if written.endswith(b"\n") else []
        if lines:
            match = LOG_FIELDS.search(lines[-1])
            assert match, lines[-1]
            return resp, body, (match["fmt"], unescape_nginx_log(match["key"]))
        time.sleep(0.05)
    raise AssertionError(f"no access log line for {path}")


def test_nginx_and_the_app_read_every_url_alike(stack: Stack) -> None:
    config = stack.config
    instances = set()
    for path, normalised in [*((path, path) for path in TABLE), *NORMALISED.items()]:
        for accept in ACCEPTS:
            suffixes = config.encoding.url_format_suffix
            key_path = urllib.parse.unquote(normalised)
            expected = parse_path(key_path, config.presets, config.limits.max_key_bytes, suffixes)
            resp, body, (nginx_token, nginx_key) = fetch(stack, path, accept)
            where = (path, accept)
            assert nginx_key == expected.key, where
            assert nginx_token == format_token(expected, accept), where
            assert (resp.status, body) == (404, f"original {expected.key!r} not found\n"), where  # the app's key
            plain, _, _ = fetch(stack, f"/{expected.preset.name}/{urllib.parse.quote(expected.key)}", ANY)
            instance = resp.getheader("X-Phizer-Instance")
            assert instance == plain.getheader("X-Phizer-Instance"), where
            instances.add(instance)
    assert len(instances) > 1  # the table's keys spread over the instances, so "same instance" meant something


def test_served_format_is_the_token(stack: Stack) -> None:
    """For an original that exists, every preset's negotiation order and every Accept: nginx's token (its cache key)
    is the app's, and the format served is the token's, so each cache entry holds what its key says."""
    config = stack.config
    for name in PRESETS:
        request = parse_path(f"/{name}/real.jpg", config.presets, 1024, config.encoding.url_format_suffix)
        for accept in ACCEPTS:
            resp, _, (nginx_token, _) = fetch(stack, f"/{name}/real.jpg", accept)
            token = format_token(request, accept)
            assert nginx_token == token, (name, accept)
            wanted = "image/jpeg" if name == "fixed" else CONTENT_TYPES[token]
            assert (resp.status, resp.getheader("Content-Type")) == (200, wanted), (name, accept)
    # Not vacuous: the orders differ. WebP for Chrome where AVIF is off, for Safari where WebP comes first.
    noavif, webpfirst = (parse_path(f"/{name}/real.jpg", config.presets, 1024) for name in ("noavif", "webpfirst"))
    assert (format_token(noavif, CHROME), format_token(webpfirst, SAFARI)) == ("webp", "webp")
    assert (format_token(webpfirst, "IMAGE/AVIF,*/*"), format_token(noavif, "IMAGE/AVIF,*/*")) == ("avif", "")


def test_presets_json_shows_each_negotiation_order(stack: Stack) -> None:
    with urllib.request.urlopen(f"{stack.url}/presets.json", timeout=30) as resp:
        served = json.load(resp)
    orders = {name: definition["negotiate"] for name, definition in served.items()}
    assert orders == {name: list(preset.get("negotiate", ["avif", "webp"])) for name, preset in PRESETS.items()}


def test_table_rows_cover_suffixes_on_and_off(stack: Stack) -> None:
    """The table is not vacuous: with suffixes on, many rows force a format; with them off, none does."""
    config = stack.config
    forced = [
        parse_path(urllib.parse.unquote(path), config.presets, 1024, config.encoding.url_format_suffix).format
        for path in TABLE
    ]
    if config.encoding.url_format_suffix:
        assert sum(fmt is not None for fmt in forced) >= 10
    else:
        assert forced == [None] * len(TABLE)


def test_over_long_urls_get_one_plain_line(stack: Stack) -> None:
    """A key over the limit is the app's 400 even where gunicorn's own limit would have answered with HTML; a
    request line over nginx's buffers is nginx's 414, in one line too."""
    resp, body, _ = fetch(stack, "/small/" + "a" * 5000 + ".jpg", ANY)
    assert (resp.status, body) == (400, f"key longer than {stack.config.limits.max_key_bytes} bytes\n")
    resp, body, _ = fetch(stack, "/small/" + "%C3%A9" * 2000 + ".jpg", ANY)
    assert (resp.status, body) == (414, "request line too long\n")


def raw_exchange(address: str | tuple[str, int], request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``request`` as is (to a TCP address, or a unix socket's path) and read the answer to its end."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family) as conn:
        conn.settimeout(30)
        conn.connect(address)
        conn.sendall(request)
        received = b""
        while chunk := conn.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


def test_gunicorns_own_refusals_are_one_plain_line(stack: Stack) -> None:
    """gunicorn refuses some requests before the app sees them, in HTML of its own: over 100 headers (nginx passes
    them on) and, straight to an instance, a request line it cannot parse. One plain line each, like the app's."""
    many = "".join(f"X-Header-{i}: {i}\r\n" for i in range(120))
    # A key no other test asks for: a cached answer (the table's 404s) would never reach gunicorn.
    request = f"GET /small/many-headers.jpg HTTP/1.1\r\nHost: phizer\r\n{many}Connection: close\r\n\r\n".encode()
    status, headers, body = raw_exchange(("127.0.0.1", stack.port), request)
    assert (status, body) == (431, b"request header fields too large\n")
    assert headers["content-type"] == "text/plain; charset=utf-8" and headers["x-cache-status"] == "MISS"
    status, headers, body = raw_exchange(str(stack.socket_path(0)), b"NOT HTTP AT ALL\r\n\r\n")
    assert (status, body) == (400, b"bad request: malformed URL or headers\n")
    assert headers["content-type"] == "text/plain; charset=utf-8"
