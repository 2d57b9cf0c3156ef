"""The app assembled in-process with a fake originals store (create_app takes its collaborators)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import falcon.testing
import pytest

from service.app import create_app
from service.cache import Head
from service.config import load_config
from service.errors import BadGateway, NotFound
from service.identity import etag_matches
from service.original import Original


class FakeStore:
    """Originals from a dict; anything else is missing, 'down/...' keys fail like a broken origin."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []

    def get(self, key: str, timings: object = None, deadline: float | None = None) -> Original:
        self.requests.append(key)
        if key.startswith("down/"):
            raise BadGateway("origin failed: fake")
        if key not in self.files:
            raise NotFound(f"original {key!r} not found")
        return Original.from_bytes(self.files[key])

    def head(self, key: str) -> None:
        return None  # like a memcached miss: revalidation needs the original


@pytest.fixture
def client(corpus: Path) -> falcon.testing.TestClient:
    store = FakeStore({"storm.jpg": (corpus / "16_storm_720_30k.jpg").read_bytes()})
    return falcon.testing.TestClient(create_app(load_config(environ={}), store=store, instance="t1"))


def test_renders_with_injected_store(client: falcon.testing.TestClient) -> None:
    resp = client.simulate_get("/thumb/storm.jpg", headers={"Accept": "image/jpeg"})
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
    assert resp.headers["x-phizer-instance"] == "t1"


def test_conditional_get_skips_rendering(client: falcon.testing.TestClient) -> None:
    etag = client.simulate_get("/small/storm.jpg").headers["etag"]
    assert etag.startswith('W/"')  # weak: see service/identity.py
    for if_none_match in (f'"other", {etag}', etag.removeprefix("W/")):  # weak comparison, as RFC 9110 says
        resp = client.simulate_get("/small/storm.jpg", headers={"If-None-Match": if_none_match})
        assert resp.status_code == 304 and resp.content == b"" and resp.headers["etag"] == etag


def test_errors_are_one_plain_line(client: falcon.testing.TestClient) -> None:
    missing = client.simulate_get("/small/missing.jpg")
    assert (missing.status_code, missing.text) == (404, "original 'missing.jpg' not found\n")
    assert missing.headers["cache-control"] == "public, max-age=60"  # nginx caches 404s briefly
    failed = client.simulate_get("/small/down/x.jpg")
    assert failed.status_code == 502 and failed.headers["cache-control"] == "no-store"
    assert "etag" not in failed.headers
    post = client.simulate_post("/small/storm.jpg")
    assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"


def test_etag_matching() -> None:
    assert etag_matches('"a", "b"', '"b"') and etag_matches("*", '"x"') and etag_matches('W/"b"', '"b"')
    assert not etag_matches(None, '"b"') and not etag_matches('"bb"', '"b"')


def test_offload_runs_on_another_native_thread_and_raises_there() -> None:
    import threading

    from service.offload import make_spawn

    spawn = make_spawn(2)
    assert spawn(threading.get_ident).get() != threading.get_ident()
    with pytest.raises(NotFound):
        spawn(lambda: FakeStore({}).get("gone.jpg")).get()


def test_a_bug_of_ours_is_a_500_not_a_corrupt_image(corpus: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only errors raised inside Pillow are the file's fault; the same exception type from our code is a bug."""
    from service import intermediates

    def broken(self: object, size: tuple[int, int], box: tuple) -> None:
        raise KeyError("a bug in phizer")

    monkeypatch.setattr(intermediates.Intermediate, "region", broken)
    store = FakeStore({"storm.jpg": (corpus / "16_storm_720_30k.jpg").read_bytes()})
    client = falcon.testing.TestClient(create_app(load_config(environ={}), store=store))
    resp = client.simulate_get("/small/storm.jpg")
    assert (resp.status_code, resp.text) == (500, "internal error\n")


@pytest.mark.parametrize("name", ["16_storm_720_30k.jpg", "14_sunset_anim.gif"], ids=["still", "animation"])
def test_a_bug_of_ours_failing_inside_pillow_is_a_500(corpus: Path, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    """A bad argument of ours makes Pillow raise inside its own code (here a resize setting it refuses): still our
    bug, never "corrupt image". Only decoding counts as the file's fault, for stills and for every animation frame."""
    from service import intermediates

    monkeypatch.setattr(intermediates, "REDUCING_GAP", 0.5)  # Pillow: "reducing_gap must be 1.0 or greater"
    client = falcon.testing.TestClient(
        create_app(load_config(environ={}), store=FakeStore({name: (corpus / name).read_bytes()}))
    )
    resp = client.simulate_get(f"/small/{name}")
    assert (resp.status_code, resp.text) == (500, "internal error\n")


def test_a_file_pillow_cannot_decode_is_still_a_422(corpus: Path) -> None:
    truncated = (corpus / "05_storm_2.5mp_baseline.jpg").read_bytes()[:20000]
    client = falcon.testing.TestClient(create_app(load_config(environ={}), store=FakeStore({"t.jpg": truncated})))
    resp = client.simulate_get("/small/t.jpg")
    assert resp.status_code == 422 and resp.text.startswith("corrupt or truncated image")
    assert resp.headers["cache-control"] == "public, max-age=60"  # a verdict on the file: not decoded each time


def test_falcons_own_errors_are_one_plain_line(client: falcon.testing.TestClient) -> None:
    resp = client.simulate_post("/healthz")  # a route without on_post: Falcon's own 405
    assert (resp.status_code, resp.text) == (405, "405 method not allowed\n")
    assert resp.headers["content-type"].startswith("text/plain") and "GET" in resp.headers["allow"]


def test_gallery_is_off_when_the_config_says_so(corpus: Path) -> None:
    config = dataclasses.replace(load_config(environ={}), gallery=False)
    off = falcon.testing.TestClient(create_app(config, store=FakeStore({})))
    assert off.simulate_get("/").status_code == 404
    on = falcon.testing.TestClient(create_app(load_config(environ={}), store=FakeStore({})))
    assert on.simulate_get("/").status_code == 200 and "<img" in on.simulate_get("/").text  # the samples


class FallbackStore(FakeStore):
    """Every original comes from a fallback origin; memcached knows the head of 'cached.jpg'."""

    def get(self, key: str, timings: object = None, deadline: float | None = None) -> Original:
        return dataclasses.replace(super().get(key, timings, deadline), fallback=True)

    def head(self, key: str) -> Head | None:
        if key != "cached.jpg":
            return None
        return Head(digest=Original.from_bytes(self.files[key]).digest, size=1, count=1, fallback=True)


def test_lifetimes_reach_nginx_on_200s_and_304s_only(client: falcon.testing.TestClient, corpus: Path) -> None:
    """X-Accel-Expires (nginx's lifetime) is the preset's on a 200 and never on an error; an original from a
    fallback origin gives the short ones, also on a 304 decided from memcached's head item."""
    ok = client.simulate_get("/small/storm.jpg")
    assert (ok.headers["x-accel-expires"], ok.headers["cache-control"]) == ("604800", "public, max-age=31536000")
    for path in ("/small/missing.jpg", "/small/down/x.jpg", "/nope/storm.jpg"):
        assert "x-accel-expires" not in client.simulate_get(path).headers, path
    photo = (corpus / "16_storm_720_30k.jpg").read_bytes()
    fallback = falcon.testing.TestClient(
        create_app(load_config(environ={}), store=FallbackStore({"storm.jpg": photo, "cached.jpg": photo}))
    )
    fresh = fallback.simulate_get("/small/storm.jpg")
    assert (fresh.headers["x-accel-expires"], fresh.headers["cache-control"]) == ("60", "public, max-age=60")
    etag = fallback.simulate_get("/small/cached.jpg").headers["etag"]
    revalidated = fallback.simulate_get("/small/cached.jpg", headers={"If-None-Match": etag})
    assert revalidated.status_code == 304 and revalidated.headers["x-accel-expires"] == "60"


def test_the_network_clients_are_built_with_the_app_not_by_the_first_miss(monkeypatch: pytest.MonkeyPatch) -> None:
    """gunicorn's worker loads the app before it accepts a request: boto3's import and client (about 0.4 s) made by
    the first miss would hold the event loop, /healthz included, in every fresh or recycled worker."""
    from pymemcache.client import hash as pymemcache_hash

    from service.origins import S3Origin

    built: list[str] = []
    monkeypatch.setattr(S3Origin, "_client", staticmethod(lambda *args: built.append("s3")))
    monkeypatch.setattr(pymemcache_hash, "HashClient", lambda *args, **kwargs: built.append("memcached"))
    config = load_config(environ={"PHIZER_ORIGINS": "s3://bucket", "PHIZER_MEMCACHED": "127.0.0.1:11211"})
    create_app(config)
    assert sorted(built) == ["memcached", "s3"]


def test_the_log_line_and_metrics_come_after_the_response(corpus: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The access log line (and the metrics with it) is written when the server closes the body, after its last
    byte: not while nginx waits for the answer (PEP 3333's close(), which gunicorn calls)."""
    store = FakeStore({"storm.jpg": (corpus / "16_storm_720_30k.jpg").read_bytes()})
    app = create_app(load_config(environ={}), store=store)
    started: list[str] = []
    environ = falcon.testing.create_environ("/thumb/storm.jpg", headers={"Accept": "image/jpeg"})
    with caplog.at_level("INFO", logger="phizer.access"):
        body = app(environ, lambda status, headers, exc_info=None: started.append(status))
        sent = b"".join(body)
        assert started == ["200 OK"] and sent[:2] == b"\xff\xd8"
        assert not [r for r in caplog.records if r.name == "phizer.access"]  # sent, not yet logged
        body.close()
    (line,) = [r.fields for r in caplog.records if r.name == "phizer.access"]
    assert (line["status"], line["bytes"], line["path"]) == (200, len(sent), "/thumb/storm.jpg")
