"""The whole stack as users reach it: nginx (rendered from nginx/nginx.conf.j2) in front of real gunicorn
instances, a real memcached, and originals in a real S3 server (moto) behind a proxy that counts GETs.

Two stacks share one module: A (supervised: dead instances come back) and B, a second "host" that uses A's
memcached and is left unsupervised so a test can take all its instances down (that test runs last).
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import signal
import statistics
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from PIL import Image

from service.identity import preset_fingerprints
from service.launcher import Stack
from service.procs import free_port
from tests.imaging import psnr
from tests.support import AWS_ENV, CountingProxy, s3_client

BUCKET = "stack"
PRESETS = ("thumb", "small", "medium", "large")
# Real browsers' Accept headers for images (Chrome, Firefox, Safari 17+): each lists AVIF, in its own order.
CHROME = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
FIREFOX = "image/avif,image/webp,image/png,image/svg+xml,image/*;q=0.8,*/*;q=0.5"
SAFARI = (
    "image/webp,image/avif,image/jxl,image/heic,image/heic-sequence,video/*;q=0.8,image/png,image/svg+xml,"
    "image/*;q=0.8,*/*;q=0.5"
)
WEBP = "image/webp,*/*"  # a browser with WebP but not AVIF
JPEG = "image/jpeg,image/png,*/*;q=0.8"


@pytest.fixture(scope="module")
def origin(corpus: Path, s3_endpoint: str) -> Iterator[CountingProxy]:
    """S3 (moto) holding small photos under many keys and one bigger photo, behind a GET-counting proxy."""
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket=BUCKET)
    small = (corpus / "16_storm_720_30k.jpg").read_bytes()
    big = (corpus / "05_storm_2.5mp_baseline.jpg").read_bytes()
    keys = ["hit.jpg", "shared.jpg", "format.jpg", "down.jpg", "avif.jpg"]
    keys += [f"spread-{i:02d}.jpg" for i in range(24)] + [f"load-{i:03d}.jpg" for i in range(100)]
    for key in keys:
        client.put_object(Bucket=BUCKET, Key=key, Body=small)
    client.put_object(Bucket=BUCKET, Key="burst.jpg", Body=big)
    client.put_object(Bucket=BUCKET, Key="anim.gif", Body=(corpus / "14_sunset_anim.gif").read_bytes())
    proxy = CountingProxy(upstream=s3_endpoint)
    yield proxy
    proxy.close()


def origin_gets(origin: CountingProxy, key: str) -> int:
    return origin.gets[f"/{BUCKET}/{key}"]


def stack_env(origin: CountingProxy) -> dict[str, str]:
    return {**AWS_ENV, "AWS_ENDPOINT_URL": origin.url, "PHIZER_ORIGINS": f"s3://{BUCKET}"}


@pytest.fixture(scope="module")
def stack(origin: CountingProxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with Stack(tmp_path_factory.mktemp("stack-a"), port=free_port(), instances=2, env=stack_env(origin)) as started:
        yield started


@pytest.fixture(scope="module")
def stack_b(stack: Stack, origin: CountingProxy, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A second host: its own nginx and instances, A's memcached, no supervision."""
    state = tmp_path_factory.mktemp("stack-b")
    with Stack(
        state, free_port(), 2, memcached=stack.memcached_servers, env=stack_env(origin), supervise=False
    ) as started:
        yield started


def get(stack: Stack, path: str, accept: str | None = None) -> requests.Response:
    return requests.get(stack.url + path, headers={"Accept": accept or ""}, timeout=30)


def upstream_requests(stack: Stack, path: str) -> int:
    """How many requests for ``path`` nginx passed to an instance (its access log names the upstream)."""
    time.sleep(0.2)  # nginx logs a request just after its last byte is sent, so a client can be faster
    lines = stack.access_log.read_text().splitlines()
    return sum(1 for line in lines if f'"GET {path} ' in line and " upstream=-" not in line)


def test_second_request_is_a_hit_that_reaches_no_instance(stack: Stack, origin: CountingProxy) -> None:
    first, second = get(stack, "/small/hit.jpg"), get(stack, "/small/hit.jpg")
    assert (first.status_code, first.headers["X-Cache-Status"]) == (200, "MISS")
    assert (second.status_code, second.headers["X-Cache-Status"]) == (200, "HIT")
    assert second.content == first.content
    assert upstream_requests(stack, "/small/hit.jpg") == 1
    assert origin_gets(origin, "hit.jpg") == 1


def test_every_preset_of_a_key_is_served_by_one_instance(stack: Stack) -> None:
    """Hashing on the key (not the whole path) keeps an original on one instance; keys still spread."""
    owner: dict[str, str] = {}
    for i in range(24):
        key = f"spread-{i:02d}.jpg"
        served_by = {get(stack, f"/{preset}/{key}").headers["X-Phizer-Instance"] for preset in PRESETS}
        suffixed = get(stack, f"/small/{key}.webp")  # a format suffix joins its original's instance
        assert suffixed.headers["Content-Type"] == "image/webp"
        served_by.add(suffixed.headers["X-Phizer-Instance"])
        assert len(served_by) == 1, f"{key} rendered by {served_by}"
        owner[key] = served_by.pop()
    assert set(owner.values()) == {"app-0", "app-1"}


def test_burst_of_misses_makes_one_upstream_request(stack: Stack, origin: CountingProxy) -> None:
    barrier = threading.Barrier(20)

    def fetch(_: int) -> requests.Response:
        barrier.wait()
        return get(stack, "/large/burst.jpg")

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(fetch, range(20)))
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    assert upstream_requests(stack, "/large/burst.jpg") == 1
    assert origin_gets(origin, "burst.jpg") == 1


def test_missing_key_reaches_the_origin_once_per_404_lifetime(stack: Stack, origin: CountingProxy) -> None:
    responses = [get(stack, "/small/no-such-photo.jpg") for _ in range(50)]
    assert {r.status_code for r in responses} == {404}
    assert "no-such-photo.jpg" in responses[0].text
    assert responses[-1].headers["X-Cache-Status"] == "HIT"
    assert origin_gets(origin, "no-such-photo.jpg") <= 2


def test_accept_is_normalised_to_one_format_token(stack: Stack) -> None:
    """Three cache entries per URL (AVIF, WebP or neither), whatever the exact Accept header; never one per header:
    Chrome, Firefox and Safari share the AVIF one, though each lists the formats in its own order."""
    path = "/small/format.jpg"
    avif, webp, jpeg = get(stack, path, CHROME), get(stack, path, WEBP), get(stack, path, "*/*")
    assert (avif.headers["Content-Type"], avif.headers["X-Cache-Status"]) == ("image/avif", "MISS")
    assert (webp.headers["Content-Type"], webp.headers["X-Cache-Status"]) == ("image/webp", "MISS")
    assert (jpeg.headers["Content-Type"], jpeg.headers["X-Cache-Status"]) == ("image/jpeg", "MISS")
    for accept, expected in [
        (FIREFOX, avif),
        (SAFARI, avif),
        ("IMAGE/AVIF", avif),
        (WEBP, webp),
        ("text/html, IMAGE/WebP;q=0.5", webp),
        (JPEG, jpeg),
        (None, jpeg),
    ]:
        again = get(stack, path, accept)
        assert again.headers["X-Cache-Status"] == "HIT", accept
        assert (again.headers["Content-Type"], again.content) == (expected.headers["Content-Type"], expected.content)
    assert upstream_requests(stack, path) == 3
    fingerprint = preset_fingerprints(stack.config)["small"]
    for token in ("avif", "webp", ""):  # nginx names a cache file by the md5 of its key, levels=1:2
        digest = hashlib.md5(f"{path}|{token}|{fingerprint}".encode()).hexdigest()
        assert (stack.state_dir / "cache" / digest[-1] / digest[-3:-1] / digest).is_file(), token


def test_avif_decodes_at_the_preset_size_and_looks_like_the_original(stack: Stack) -> None:
    """Each browser's AVIF (decoded by pillow-avif-plugin, as the service imports it) has the preset's exact size
    and the picture of the JPEG rendition; the URL suffix .avif forces AVIF whatever Accept says."""
    for preset, size in [("thumb", (150, 150)), ("large", (720, 480))]:  # the original is 720x480
        path = f"/{preset}/avif.jpg"
        reference = Image.open(io.BytesIO(get(stack, path, "*/*").content)).convert("RGB")
        for accept in (CHROME, FIREFOX, SAFARI):
            response = get(stack, path, accept)
            out = Image.open(io.BytesIO(response.content))
            assert (out.format, out.size, response.headers["Vary"]) == ("AVIF", size, "Accept"), (path, accept)
            assert psnr(out.convert("RGB"), reference) > 30, (path, accept)
    suffixed = get(stack, "/small/avif.jpg.avif", "*/*")
    assert suffixed.headers["Content-Type"] == "image/avif" and "Vary" not in suffixed.headers
    assert Image.open(io.BytesIO(suffixed.content)).size == (320, 213)


def test_animation_stays_animated_for_avif_browsers(stack: Stack) -> None:
    """Our AVIF is a still: a browser that takes AVIF gets the animation as animated WebP (every AVIF browser
    takes WebP), and GIF without either."""
    for accept, fmt in [(CHROME, "WEBP"), (SAFARI, "WEBP"), ("*/*", "GIF")]:
        out = Image.open(io.BytesIO(get(stack, "/small/anim.gif", accept).content))
        assert (out.format, out.n_frames, out.size) == (fmt, 12, (320, 213)), accept


def test_kept_alive_hits_of_large_renditions_are_not_held_back(stack: Stack, s3_endpoint: str) -> None:
    """A cache hit is read from a file whose body starts at an unaligned offset (after nginx's header, the key and
    the stored upstream headers). With sendfile, Linux 6.x held the tail of such 64-100 KB answers about 40 ms on
    a kept-alive connection, every time (measured: 1,700 hits/s instead of 56,000 for an 83 KB rendition), which
    is every browser's connection. Renditions of 66-140 KB (noise: PNG cannot shrink it), each asked 10 times on
    one connection; a median under 20 ms leaves room for a slow machine and none for the stall."""
    client = s3_client(s3_endpoint)
    rng = random.Random(13)
    paths = []
    for i, height in enumerate(range(110, 240, 13)):  # 200 px wide: 66-140 KB of RGB, a few hundred bytes apart
        buf = io.BytesIO()
        Image.frombytes("RGB", (200, height), rng.randbytes(200 * height * 3)).save(buf, "PNG")
        client.put_object(Bucket=BUCKET, Key=f"noise-{i:02d}.png", Body=buf.getvalue())
        paths.append(f"/medium/noise-{i:02d}.png.png")  # the suffix asks for PNG: lossless, so noise stays big
    with requests.Session() as session:
        for path in paths:
            first = session.get(stack.url + path, timeout=30)
            assert first.status_code == 200 and len(first.content) > 64 * 1024, (path, first.status_code)
            times = []
            for _ in range(10):
                start = time.perf_counter()
                hit = session.get(stack.url + path, timeout=30)
                times.append(time.perf_counter() - start)
                assert hit.headers["X-Cache-Status"] == "HIT" and hit.content == first.content
            assert statistics.median(times) < 0.02, (path, len(first.content), [round(t * 1000, 1) for t in times])


def test_nginx_answers_wrong_paths_itself_in_one_line(stack: Stack) -> None:
    for path in ("/nope/hit.jpg", "/small/", "/small", "/favicon.ico"):  # ("/" is the gallery)
        response = get(stack, path)
        assert (response.status_code, response.text) == (404, "not found: expected /<preset>/<key>\n"), path
        assert "X-Phizer-Instance" not in response.headers
    malformed = get(stack, "/small/a%00b.jpg")  # nginx refuses a NUL in the path before any location
    assert (malformed.status_code, malformed.text) == (400, "bad request: malformed URL or headers\n")
    for path in ("/healthz", "/presets.json"):
        assert get(stack, path).headers["X-Cache-Status"] == "BYPASS"
        assert get(stack, path).status_code == 200
    assert set(get(stack, "/presets.json").json()) == set(PRESETS)


def test_killed_instance_costs_no_request_and_comes_back(stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    urls = iter(f"/{p}/load-{i:03d}.jpg" for i in range(100) for p in PRESETS)
    lock = threading.Lock()
    outcomes: list[tuple[float, int, str]] = []

    def load() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    path = next(urls, None)
                if path is None:
                    return
                try:
                    status = session.get(stack.url + path, timeout=30).status_code
                except requests.RequestException:
                    status = 0
                outcomes.append((time.monotonic(), status, path))

    victim = stack.instances[0]
    threads = [threading.Thread(target=load) for _ in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    killed_at = time.monotonic()
    os.killpg(victim.pid, signal.SIGKILL)  # the instance's master and worker, as a crash would
    for thread in threads:
        thread.join(120)
    # Every request is answered by the other instance, except (rarely) the one response the victim was
    # writing at the instant of the kill: nginx had already forwarded its 200 header, so it cannot replay
    # it elsewhere and the client sees it cut. One gevent worker writes one response at a time: at most one.
    failed = {path for _, status, path in outcomes if status != 200}
    lines = [line for line in stack.access_log.read_text().splitlines() if any(f" {p} " in line for p in failed)]
    cut = [line for line in lines if '" 200 ' in line and f"upstream=unix:{stack.socket_path(0)} " in line]
    assert len(failed) <= 1 and len(cut) == len(failed), "\n".join(lines) + stack.logs.joinpath("error.log").read_text()
    assert sum(1 for t, _, _ in outcomes if t > killed_at) > 20, "the load ended before the kill"

    deadline = time.monotonic() + 60
    while not any(old == victim.pid for _, old, _ in stack.restarts) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert [name for name, old, _ in stack.restarts if old == victim.pid] == ["app-0"]
    assert f"app-0 (pid {victim.pid}) exited" in caplog.text
    # It rejoins: nginx never takes an instance out of its ring (max_fails=0), so keys that hash to it are rendered
    # there again as soon as it answers.
    deadline, n, served_by = time.monotonic() + 30, 0, ""
    while served_by != "app-0" and time.monotonic() < deadline:
        n += 1
        served_by = get(stack, f"/small/rejoin-{n}.jpg").headers["X-Phizer-Instance"]
        time.sleep(0.05)
    assert served_by == "app-0"


def test_second_stack_uses_the_first_stacks_memcached(stack: Stack, stack_b: Stack, origin: CountingProxy) -> None:
    assert stack_b.memcached is None and stack_b.memcached_servers == stack.memcached_servers
    assert get(stack, "/small/shared.jpg").status_code == 200
    assert origin_gets(origin, "shared.jpg") == 1
    on_b = get(stack_b, "/small/shared.jpg")
    assert (on_b.status_code, on_b.headers["X-Cache-Status"]) == (200, "MISS")  # rendered by B's instance
    assert origin_gets(origin, "shared.jpg") == 1


def test_every_instance_down_cached_still_served_uncached_502(stack_b: Stack) -> None:
    """Runs last: it leaves stack B without instances."""
    assert get(stack_b, "/thumb/down.jpg").status_code == 200
    for instance in stack_b.instances:
        instance.stop()
    cached = get(stack_b, "/thumb/down.jpg")
    assert (cached.status_code, cached.headers["X-Cache-Status"]) == (200, "HIT")
    started = time.monotonic()
    uncached = get(stack_b, "/small/down.jpg")
    assert time.monotonic() - started < 5
    assert (uncached.status_code, uncached.text) == (502, "no phizer instance answered\n")
