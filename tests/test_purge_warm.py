"""`phizer purge`, `phizer warm`, `phizer check-config` and `phizer --help`, through the installed command, against the
real stack (nginx from the project's template, gunicorn instances, memcached) and an origin that counts its GETs.

Stack A reads originals from a folder first (what `warm --prefix` lists) and then from the counting HTTP origin
(what the purge tests replace). Stack B is a second host sharing A's memcached, whose nginx also lets 127.0.0.2
use the admin API (PHIZER_ADMIN_ALLOW), while A lets only 127.0.0.1 in: a request from 127.0.0.2 reaches A's
nginx from a real non-allowed address.
"""

from __future__ import annotations

import dataclasses
import http.client
import http.server
import io
import json
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import urllib3
import yaml
from PIL import Image

from service.cache import MemcachedOriginals, origins_namespace
from service.config import load_config
from service.launcher import Stack
from service.origins import list_keys
from service.procs import free_port
from service.purge import Rendition, renditions
from service.signature import sign
from service.warm import _get
from tests.support import AWS_ENV, REPO, VENV_BIN, CountingProxy, s3_client

PRESETS = {
    "thumb": {"width": 150, "height": 150, "fit": "cover", "negotiate": ["webp"]},  # two tokens: WebP or none
    "small": {"width": 320},  # three tokens: AVIF, WebP or none
    "fixed": {"width": 200, "format": "webp"},  # no format token: its format is never negotiated
}
WEBP = "image/webp,*/*"  # a browser with WebP but not AVIF
AVIF = "image/avif,image/webp,*/*"
JPEG = "image/jpeg,*/*;q=0.8"
WARM_KEYS = [f"w/{i}.jpg" for i in range(3)]
SIGNING_KEY = "purge-test-signing-key"  # signed ad-hoc sizes are on: purge finds their cached renditions too
PHIZER = VENV_BIN / "phizer"


def phizer(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """The installed `phizer` command (make install puts it in the venv), running this checkout's code: the venv
    may be shared with another checkout (a worktree), whose `service` its editable install would import."""
    if not PHIZER.exists():
        pytest.fail(f"{PHIZER} is missing: run `make install` (it installs the project's console script)")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([str(PHIZER), *args], capture_output=True, text=True, timeout=timeout, check=False, env=env)


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


@pytest.fixture(scope="module")
def photos(corpus: Path) -> tuple[bytes, bytes]:
    """Two originals of different shapes: the one first uploaded, and its replacement (rotated: 480x720)."""
    first = (corpus / "16_storm_720_30k.jpg").read_bytes()
    return first, jpeg(Image.open(io.BytesIO(first)).rotate(90, expand=True))


@pytest.fixture(scope="module")
def origin(photos: tuple[bytes, bytes]) -> Iterator[CountingProxy]:
    proxy = CountingProxy(files={"/p/photo.jpg": photos[0], "/m/two.jpg": photos[0], "/s/signed.jpg": photos[0]})
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def config_path(tmp_path_factory: pytest.TempPathFactory, origin: CountingProxy, photos: tuple[bytes, bytes]) -> Path:
    folder = tmp_path_factory.mktemp("purge-warm")
    originals = folder / "originals"
    (originals / "w").mkdir(parents=True)
    for key in WARM_KEYS:
        (originals / key).write_bytes(photos[0])
    (originals / "other.jpg").write_bytes(photos[0])  # outside the warmed prefix
    path = folder / "config.yaml"
    raw = {"origins": [f"file://{originals}", origin.url], "allow_private_origins": True, "presets": PRESETS}
    raw["signing"] = {"keys": [SIGNING_KEY]}
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def stack(config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"PHIZER_CONFIG": str(config_path)}
    with Stack(tmp_path_factory.mktemp("stack-a"), port=free_port(), instances=2, env=env) as started:
        yield started


@pytest.fixture(scope="module")
def stack_b(stack: Stack, config_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    env = {"PHIZER_CONFIG": str(config_path), "PHIZER_ADMIN_ALLOW": "127.0.0.2"}
    state = tmp_path_factory.mktemp("stack-b")
    with Stack(state, port=free_port(), instances=1, memcached=stack.memcached_servers, env=env) as started:
        yield started


def get(stack: Stack, path: str, accept: str = "") -> requests.Response:
    """A GET on a new connection each time, so both nginx workers answer some (each has its own open files)."""
    return requests.get(stack.url + path, headers={"Accept": accept, "Connection": "close"}, timeout=30)


def cached(stack: Stack, path: str, accept: str = "") -> requests.Response:
    """The answer once nginx serves it from its cache. nginx sends a miss's last bytes before it has put the
    response in its cache, so a request right after a miss can miss again (seen in CI): ask again, a moment
    later, a few times (as bench/scenarios.py's B1 does)."""
    for attempt in range(5):
        response = get(stack, path, accept)
        if response.headers["X-Cache-Status"] == "HIT":
            break
        time.sleep(0.05 * (attempt + 1))
    return response


def wait_in_memcached(stack: Stack, key: str) -> None:
    """The original is stored in memcached in the background: wait for it, so later requests find it there."""
    options = dataclasses.replace(stack.config.memcached, servers=tuple(stack.memcached_servers))
    cache = MemcachedOriginals(options, stack.config.limits, origins_namespace(stack.config.origins))
    deadline = time.monotonic() + 10
    while cache.head(key) is None:
        assert time.monotonic() < deadline, f"{key} never reached memcached"
        time.sleep(0.05)


def from_address(stack: Stack, source: str, method: str, path: str, body: bytes = b"") -> tuple[int, str]:
    """A request to the stack's nginx (on 127.0.0.1) sent from another local address."""
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=30, source_address=(source, 0))
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    result = resp.status, resp.read().decode()
    conn.close()
    return result


def test_purge_makes_every_rendition_a_miss_with_one_new_origin_get(
    stack: Stack, origin: CountingProxy, photos: tuple[bytes, bytes]
) -> None:
    """Every preset, both format tokens, format suffixes: HITs before; after the original is replaced and purged,
    each is a MISS with the new image, and the new original is fetched once."""
    # One request per cache entry: "fixed" negotiates nothing, so both Accepts share one entry.
    cases = [(f"/{preset}/p/photo.jpg", accept) for preset in ("thumb", "small") for accept in (WEBP, JPEG)]
    cases += [("/small/p/photo.jpg", AVIF)]  # small's third token (thumb negotiates WebP only)
    cases += [("/fixed/p/photo.jpg", JPEG), ("/small/p/photo.jpg.webp", ""), ("/thumb/p/photo.jpg.png", "")]
    before = {}
    assert get(stack, *cases[0]).status_code == 200  # the first miss fetches the original and stores it in memcached
    wait_in_memcached(stack, "p/photo.jpg")  # a second miss of any entry below finds it there, not at the origin
    for path, accept in cases:
        assert get(stack, path, accept).status_code == 200
        assert cached(stack, path, accept).headers["X-Cache-Status"] == "HIT", path
        hits = [get(stack, path, accept) for _ in range(4)]  # each nginx worker now holds the file open
        assert {r.headers["X-Cache-Status"] for r in hits} == {"HIT"}, path
        before[path, accept] = hits[0].content
    assert origin.gets["/p/photo.jpg"] == 1

    origin.files["/p/photo.jpg"] = photos[1]  # replaced under the same key: caches still serve the old one
    assert get(stack, "/small/p/photo.jpg").headers["X-Cache-Status"] == "HIT"
    purged = phizer("purge", "p/photo.jpg", "--host", stack.url)
    assert purged.returncode == 0, purged.stderr
    # 8 entries: thumb has two tokens, small three, fixed one, plus the two suffix forms.
    expected = f"{stack.url}: p/photo.jpg: 8 cached renditions removed, original removed from memcached\n"
    assert purged.stdout == expected

    first_path, first_accept = cases[0]
    first = get(stack, first_path, first_accept)
    assert (first.status_code, first.headers["X-Cache-Status"]) == (200, "MISS")
    wait_in_memcached(stack, "p/photo.jpg")
    for path, accept in cases[1:]:
        after = get(stack, path, accept)
        assert (after.status_code, after.headers["X-Cache-Status"]) == (200, "MISS"), path
        assert after.content != before[path, accept]
        if path.startswith("/small/"):
            assert Image.open(io.BytesIO(after.content)).size == (320, 480)  # the rotated replacement
        assert cached(stack, path, accept).headers["X-Cache-Status"] == "HIT"
    assert get(stack, "/fixed/p/photo.jpg", WEBP).headers["X-Cache-Status"] == "HIT"
    assert origin.gets["/p/photo.jpg"] == 2  # exactly one new origin GET
    assert "[crit]" not in stack.logs.joinpath("error.log").read_text()


def test_purge_removes_cached_signed_sizes(stack: Stack, origin: CountingProxy, photos: tuple[bytes, bytes]) -> None:
    """Signed ad-hoc sizes (any size, fit and signature) cannot be listed from the key: purge finds them in the cache
    folder; another key's signed size stays cached."""
    paths = []
    for signed in ("200x/s/signed.jpg", "120x90/cover/north/s/signed.jpg", "200x/w/0.jpg"):
        paths.append(f"/_/{sign([SIGNING_KEY], signed)}/{signed}")
    cases = [(paths[0], AVIF), (paths[0], JPEG), (paths[1], WEBP), (paths[2], JPEG)]
    for path, accept in cases:
        assert get(stack, path, accept).status_code == 200, path
        # A second miss of the entry finds its original there (each key here is the path's last two segments).
        wait_in_memcached(stack, "/".join(path.split("/")[-2:]))
        assert cached(stack, path, accept).headers["X-Cache-Status"] == "HIT", path
    origin.files["/s/signed.jpg"] = photos[1]
    purged = phizer("purge", "s/signed.jpg", "--host", stack.url)
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout == f"{stack.url}: s/signed.jpg: 3 cached renditions removed, original removed from memcached\n"
    for path, accept in cases[:3]:
        after = get(stack, path, accept)
        assert (after.status_code, after.headers["X-Cache-Status"]) == (200, "MISS"), (path, accept)
        wait_in_memcached(stack, "s/signed.jpg")
    assert Image.open(io.BytesIO(get(stack, paths[0], JPEG).content)).size == (200, 300)  # the rotated replacement
    assert origin.gets["/s/signed.jpg"] == 2
    assert get(stack, paths[2], JPEG).headers["X-Cache-Status"] == "HIT"  # another key: untouched


def test_purge_of_a_cached_404_lets_a_new_upload_show(stack: Stack, origin: CountingProxy) -> None:
    assert get(stack, "/small/p/late.jpg").status_code == 404
    origin.files["/p/late.jpg"] = origin.files["/p/photo.jpg"]
    late = get(stack, "/small/p/late.jpg")
    assert (late.status_code, late.headers["X-Cache-Status"]) == (404, "HIT")
    purged = phizer("purge", "p/late.jpg", "--host", stack.url)
    assert "p/late.jpg: 1 cached renditions removed, original not in memcached" in purged.stdout
    assert get(stack, "/small/p/late.jpg").status_code == 200


def test_purge_reaches_every_host_given(stack: Stack, stack_b: Stack, origin: CountingProxy) -> None:
    for host in (stack, stack_b):
        get(host, "/small/m/two.jpg")
        assert get(host, "/small/m/two.jpg").headers["X-Cache-Status"] == "HIT"
    gets = origin.gets["/m/two.jpg"]
    purged = phizer("purge", "m/two.jpg", "--host", stack.url, "--host", stack_b.url + "/")
    assert purged.returncode == 0, purged.stderr
    assert [line.split(": ", 1)[0] for line in purged.stdout.splitlines()] == [stack.url, stack_b.url]
    assert "1 cached renditions removed, original removed from memcached" in purged.stdout.splitlines()[0]
    assert "1 cached renditions removed, original not in memcached" in purged.stdout.splitlines()[1]
    assert get(stack, "/small/m/two.jpg").headers["X-Cache-Status"] == "MISS"
    wait_in_memcached(stack, "m/two.jpg")
    assert get(stack_b, "/small/m/two.jpg").headers["X-Cache-Status"] == "MISS"
    assert origin.gets["/m/two.jpg"] == gets + 1


def test_purge_reaches_every_host_of_an_ansible_inventory(
    stack: Stack, stack_b: Stack, origin: CountingProxy, tmp_path: Path
) -> None:
    """The inventory's nginx group (here a child of it, with the listen port from group_vars and host vars)."""
    inventory = tmp_path / "inventory"
    (inventory / "group_vars").mkdir(parents=True)
    hosts = {
        "a.test": {"ansible_host": "127.0.0.1"},
        "b.test": {"ansible_host": "127.0.0.1", "nginx_listen": f"127.0.0.1:{stack_b.port}"},
        "db.test": {"ansible_host": "127.0.0.3"},  # not an nginx host: never asked
    }
    groups = {
        "nginx": {"children": {"web": {"hosts": {"a.test": None, "b.test": None}}}},
        "db": {"hosts": {"db.test": None}},
    }
    (inventory / "hosts.yml").write_text(yaml.safe_dump({"all": {"hosts": hosts, "children": groups}}))
    (inventory / "group_vars" / "web.yml").write_text(yaml.safe_dump({"nginx_listen": f"0.0.0.0:{stack.port}"}))
    for host in (stack, stack_b):
        get(host, "/thumb/m/two.jpg")
        assert get(host, "/thumb/m/two.jpg").headers["X-Cache-Status"] == "HIT"
    purged = phizer("purge", "m/two.jpg", "--inventory", str(inventory))
    assert purged.returncode == 0, purged.stderr
    assert [line.split(": ", 1)[0] for line in purged.stdout.splitlines()] == [stack.url, stack_b.url]
    for host in (stack, stack_b):
        assert get(host, "/thumb/m/two.jpg").headers["X-Cache-Status"] == "MISS"
    refused = phizer("purge", "m/two.jpg", "--inventory", str(inventory), "--group", "nowhere")
    assert refused.returncode == 1 and "no host in group 'nowhere'" in refused.stderr


def test_admin_api_refuses_addresses_nginx_does_not_allow(stack: Stack, stack_b: Stack) -> None:
    """A's nginx allows loopback's 127.0.0.1 only: 127.0.0.2 gets nginx's 403 and the instance never hears of
    it; B's nginx also allows 127.0.0.2 (PHIZER_ADMIN_ALLOW)."""
    assert get(stack, "/thumb/other.jpg").status_code == 200
    body = json.dumps({"keys": ["other.jpg"]}).encode()
    for method in ("POST", "GET"):
        assert from_address(stack, "127.0.0.2", method, "/_phizer/purge", body) == (
            403,
            "forbidden: not an admin address\n",
        )
    time.sleep(0.2)  # nginx logs just after answering
    refused = [line for line in stack.access_log.read_text().splitlines() if line.startswith("127.0.0.2 ")]
    assert len(refused) == 2 and all(" 403 " in line and " upstream=- " in line for line in refused), refused
    assert get(stack, "/thumb/other.jpg").headers["X-Cache-Status"] == "HIT"  # nothing was purged

    assert from_address(stack_b, "127.0.0.2", "POST", "/_phizer/purge", body)[0] == 200
    # Other methods stay refused by nginx, the admin path included; malformed purges by the instance.
    assert requests.delete(stack.url + "/_phizer/purge", timeout=10).status_code == 405
    assert requests.post(stack.url + "/small/other.jpg", timeout=10).status_code == 405
    assert requests.post(stack.url + "/_phizer/purge", data=b'{"keys": ["../x"]}', timeout=10).status_code == 400
    assert requests.get(stack.url + "/_phizer/purge", timeout=10).status_code == 405  # the instance: POST only


def test_warm_renders_every_preset_and_token_then_all_hit(stack: Stack, config_path: Path) -> None:
    warmed = phizer("warm", "--prefix", "w/", "--url", stack.url, "--config", str(config_path), "--concurrency", "4")
    assert warmed.returncode == 0, warmed.stdout + warmed.stderr
    todo = len(WARM_KEYS) * 6  # thumb: WebP and not; small: AVIF, WebP and neither; fixed: one (/presets.json says)
    assert f"warmed {len(WARM_KEYS)} keys ({todo} renditions)" in warmed.stdout
    assert f"done: {todo} (MISS {todo})" in warmed.stdout and "errors: 0" in warmed.stdout
    bar = warmed.stderr.strip().splitlines()[-1]  # tqdm's last line: done/total, elapsed<ETA, rate, errors
    assert f"{todo}/{todo} [" in bar and "img/s" in bar and "errors=0" in bar, bar
    for key in WARM_KEYS:
        for preset in PRESETS:
            for accept in (AVIF, WEBP, JPEG, ""):
                response = get(stack, f"/{preset}/{key}", accept)
                assert (response.status_code, response.headers["X-Cache-Status"]) == (200, "HIT"), (key, preset)
    assert get(stack, "/small/other.jpg").headers["X-Cache-Status"] == "MISS"  # not under the prefix

    again = phizer("warm", *WARM_KEYS, "--url", stack.url, "--no-progress")
    assert f"done: {todo} (HIT {todo})" in again.stdout
    missing = phizer("warm", "w/none.jpg", "--url", stack.url)
    assert missing.returncode == 1 and "errors: 6 (404: 6)" in missing.stdout
    assert "6/6 [" in missing.stderr and "errors=6" in missing.stderr.strip().splitlines()[-1], missing.stderr


def test_warm_lists_s3_and_folder_origins(s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = s3_client(s3_endpoint)
    client.create_bucket(Bucket="warm-list")
    for key in ("originals/a/1.jpg", "originals/a/2.jpg", "originals/b/3.jpg", "elsewhere/a/4.jpg"):
        client.put_object(Bucket="warm-list", Key=key, Body=b"x")
    for name, value in {**AWS_ENV, "AWS_ENDPOINT_URL": s3_endpoint}.items():
        monkeypatch.setenv(name, value)
    config = load_config(environ={"PHIZER_ORIGINS": "s3://warm-list/originals"})
    assert list(list_keys(config, "a/")) == ["a/1.jpg", "a/2.jpg"]
    assert list(list_keys(config, "")) == ["a/1.jpg", "a/2.jpg", "b/3.jpg"]
    for key in ("a/1.jpg", "a/b/2.jpg", "ab.jpg", "c.jpg"):
        (tmp_path / key).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / key).write_bytes(b"x")
    config = load_config(environ={"PHIZER_ORIGINS": f"file://{tmp_path}"})
    assert list(list_keys(config, "a")) == ["a/1.jpg", "a/b/2.jpg", "ab.jpg"]
    assert list(list_keys(config, "a/b/")) == ["a/b/2.jpg"]
    with pytest.raises(ValueError, match="give keys"):
        list(list_keys(load_config(environ={"PHIZER_ORIGINS": "https://example.com/x"}), ""))


def test_warm_retries_a_503_after_its_retry_after() -> None:
    answers = iter([503, 503, 200])
    seen: list[float] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append(time.monotonic())
            status = next(answers, 503)
            self.send_response(status)
            if status == 503:
                self.send_header("Retry-After", "1")
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        http_pool = urllib3.PoolManager(retries=False)
        assert _get(http_pool, url, Rendition("/small/a.jpg", "", ""), retries=3) == ("200", "-", 2)
        assert seen[1] - seen[0] >= 0.9 and seen[2] - seen[1] >= 0.9  # it waited as told
        answers = iter([503] * 10)
        assert _get(http_pool, url, Rendition("/small/a.jpg", "", ""), retries=1) == ("503", "-", 1)
    finally:
        server.shutdown()
        server.server_close()


def test_renditions_follow_the_url_rules() -> None:
    presets = load_config(environ={}).presets  # every bundled preset is "auto"
    paths = {(r.path, r.token) for r in renditions(presets, "a/b.jpg", 1024, format_suffix=True)}
    assert {("/small/a/b.jpg", token) for token in ("avif", "webp", "")} <= paths
    assert ("/small/a/b.jpg.webp", "") in paths and ("/small/a/b.jpg.webp", "webp") not in paths
    assert len(paths) == len(presets) * (3 + 12)  # three tokens; six suffixes, lower and upper case
    webp_only = {"small": dataclasses.replace(presets["small"], negotiate=("webp",))}
    assert {r.token for r in renditions(webp_only, "a/b.jpg", 1024, format_suffix=False)} == {"webp", ""}
    plain = {r.path for r in renditions(presets, "a/b", 1024, format_suffix=True)}
    assert plain == {f"/{name}/a/b" for name in presets}  # no extension, no suffix forms
    suffix_only = {r.path for r in renditions(presets, "x.jpg.webp", 1024, format_suffix=True)}
    assert "/small/x.jpg.webp" not in suffix_only  # that URL is x.jpg as WebP
    off = {r.path for r in renditions(presets, "a/b.jpg", 1024, format_suffix=False)}
    assert off == {f"/{name}/a/b.jpg" for name in presets}


def test_check_config_names_the_bad_key_or_prints_the_presets(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"origins": ["file:///srv/images"], "presets": PRESETS}))
    checked = phizer("check-config", str(good))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.startswith(f"{good}: valid\npresets:\n")
    for name in PRESETS:
        assert f"\n  {name} " in checked.stdout
    assert "fit=cover" in checked.stdout and "format=webp" in checked.stdout
    assert "format=auto[webp] " in checked.stdout and "format=auto[avif,webp] " in checked.stdout  # the orders
    assert "\n  max_pixels = 50000000\n" in checked.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"origins": ["file:///srv"], "presets": PRESETS, "limits": {"max_pixel": 1}}))
    refused = phizer("check-config", str(bad))
    assert refused.returncode == 1 and refused.stdout == ""
    assert "limits.max_pixel: unknown key" in refused.stderr
    broken_preset = {**PRESETS, "small": {"width": 320, "fit": "fill"}}
    bad.write_text(yaml.safe_dump({"origins": ["file:///srv"], "presets": broken_preset}))
    assert "presets.small.fit: must be one of" in phizer("check-config", str(bad)).stderr


def test_help_of_every_command() -> None:
    top = phizer("--help")
    assert top.returncode == 0
    for command in ("run", "purge", "warm", "check-config", "bench", "soak"):
        assert command in top.stdout
        sub = phizer(command, "--help")
        assert sub.returncode == 0 and sub.stdout.startswith(f"usage: phizer {command}"), sub.stdout + sub.stderr
    module = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "service.cli", "--help"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert module.returncode == 0 and "check-config" in module.stdout
