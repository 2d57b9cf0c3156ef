"""The originals cache against a real memcached (and real instances sharing one), and single-flight under real
concurrency."""

from __future__ import annotations

import io
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from PIL import Image
from pymemcache.client.base import Client

from service.cache import (
    Head,
    MemcachedOriginals,
    OriginalStore,
    SingleFlight,
    cache_key,
    chunk_keys,
    origins_namespace,
)
from service.config import ConfigError, Limits, MemcachedOptions, parse_config
from service.original import Original
from service.origins import OriginChain, make_origin
from tests import support

NAMESPACE = origins_namespace(["s3://tests/originals"])


def _cache(server: str, namespace: str = NAMESPACE, **limits: Any) -> MemcachedOriginals:
    """A cache on ``server``; ``limits`` override Limits' fields (with a 1 s memcached timeout unless given)."""
    limits.setdefault("memcached_timeout", 1.0)
    return MemcachedOriginals(MemcachedOptions(servers=(server,)), Limits(**limits), namespace)


def _raw(server: str) -> Client:
    """A plain client for writing what phizer never would: tampered chunks, forged heads."""
    host, _, port = server.rpartition(":")
    return Client((host, int(port)), connect_timeout=1, timeout=1)


def test_large_original_round_trips_in_chunks(memcached_server: str) -> None:
    cache = _cache(memcached_server)
    original = Original.from_bytes(os.urandom(3_500_000))  # over memcached's default 1 MiB item limit
    assert cache.get("big.jpg") is None
    cache.set("big.jpg", original)
    assert cache.get("big.jpg") == original
    # A lost chunk (eviction) is a miss, never a truncated original.
    cache.client.delete(chunk_keys(cache_key(NAMESPACE, "big.jpg"), original.digest, 4)[2])
    assert cache.get("big.jpg") is None


def test_namespaces_keep_deployments_apart(memcached_server: str) -> None:
    one, two = origins_namespace(["s3://one/originals"]), origins_namespace(["s3://two/originals"])
    # The order counts too: the first origin that has a key wins, so another order may serve other bytes.
    assert origins_namespace(["s3://a", "file:///b"]) != origins_namespace(["file:///b", "s3://a"])
    first, second = Original.from_bytes(b"from one"), Original.from_bytes(b"from two")
    _cache(memcached_server, one).set("same key.jpg", first)
    _cache(memcached_server, two).set("same key.jpg", second)
    assert _cache(memcached_server, one).get("same key.jpg") == first
    assert _cache(memcached_server, two).get("same key.jpg") == second
    third = _cache(memcached_server, origins_namespace(["s3://three/originals"]))
    assert third.get("same key.jpg") is None and third.head("same key.jpg") is None
    # Keys stay within memcached's rules whatever the object key (max 250 bytes, no spaces).
    longest = chunk_keys(cache_key(one, "x " * 1024), "f" * 32, 100)[-1]
    assert len(longest) <= 250 and " " not in longest
    with pytest.raises(ValueError):
        _cache(memcached_server, "with space")


def test_deployments_with_other_origins_never_serve_each_others_originals(
    memcached_server: str, tmp_path: Path
) -> None:
    """Two real instances sharing one memcached, each reading its own folder, where the same key is another picture:
    the second renders its own original, not the one the first cached under that key."""
    origins = {}
    for name, size in {"one": (400, 200), "two": (200, 400)}.items():
        (tmp_path / name).mkdir()
        Image.new("RGB", size, "red").save(tmp_path / name / "same.jpg")
        origins[name] = f"file://{tmp_path / name}"
    served = []
    for name, origin in origins.items():
        with support.instance(tmp_path / f"instance-{name}", [origin], [memcached_server], name=name) as (_, url):
            resp = requests.get(f"{url}/small/same.jpg", headers={"Accept": "image/jpeg"}, timeout=30)
            served.append(Image.open(io.BytesIO(resp.content)).size)
        deadline = time.monotonic() + 10
        while _cache(memcached_server, origins_namespace([origin])).head("same.jpg") is None:  # stored meanwhile
            assert time.monotonic() < deadline, "the original never reached memcached: the test would prove nothing"
            time.sleep(0.05)
    assert served == [(320, 160), (200, 400)]  # "small" is 320 px wide, never enlarged: each its own picture


def test_tampered_chunk_is_a_miss(memcached_server: str, caplog: pytest.LogCaptureFixture) -> None:
    cache = _cache(memcached_server)
    original = Original.from_bytes(os.urandom(2_500_000))
    cache.set("tampered.jpg", original)
    assert cache.get("tampered.jpg") == original
    names = chunk_keys(cache_key(NAMESPACE, "tampered.jpg"), original.digest, 3)
    raw = _raw(memcached_server)
    try:
        raw.set(names[1], os.urandom(1_000_000), noreply=False)  # same size, other bytes
        with caplog.at_level(logging.WARNING, logger="service.cache"):
            assert cache.get("tampered.jpg") is None
        assert "does not match its digest" in caplog.text
        raw.set(names[1], b"short", noreply=False)
        assert cache.get("tampered.jpg") is None
    finally:
        raw.close()


def test_forged_heads_are_quick_misses(memcached_server: str) -> None:
    cache = _cache(memcached_server, max_original_bytes=10_000_000)
    digest = Original.from_bytes(b"x").digest
    forged = [
        f"{digest}:1000:{10**9}",  # a billion chunks for 1000 bytes
        f"{digest}:{10**12}:{10**6}",  # a terabyte (chunk count consistent with it)
        f"{digest}:10000001:11",  # one byte over limits.max_original_bytes
        f"{digest}:-1:0",
        f"{digest}:2500000:2",  # count does not fit the size
        f"{'z' * 32}:1:1",  # not hex
        f"{digest.upper()}:1:1",  # set never writes upper case
        f"{digest}:1",
        f"{digest}:1:1:1",
        f"{digest}:{'9' * 5000}:1",  # too many digits for int() to parse
        "",
        "garbage",
    ]
    raw = _raw(memcached_server)
    head_key = cache_key(NAMESPACE, "forged.jpg")
    try:
        for head in [*forged, os.urandom(64)]:
            raw.set(head_key, head, noreply=False)
            started = time.monotonic()
            assert cache.get("forged.jpg") is None, head
            assert cache.head("forged.jpg") is None, head
            assert time.monotonic() - started < 0.5, head
    finally:
        raw.close()
    cache.set("forged.jpg", Original.from_bytes(b"x"))  # the real thing is still a hit
    assert cache.get("forged.jpg") == Original.from_bytes(b"x")


def test_head_reads_the_head_only(memcached_server: str) -> None:
    cache = _cache(memcached_server)
    original = Original.from_bytes(os.urandom(1_500_000))
    assert cache.head("etag.jpg") is None
    cache.set("etag.jpg", original)
    assert cache.head("etag.jpg") == Head(original.digest, 1_500_000, 2, fallback=False)
    cache.client.delete(chunk_keys(cache_key(NAMESPACE, "etag.jpg"), original.digest, 2)[0])
    assert cache.get("etag.jpg") is None and cache.head("etag.jpg").digest == original.digest


def test_fallback_flag_survives_memcached_and_expires_early(memcached_server: str) -> None:
    """An original a fallback origin served comes back flagged (its renditions stay short-lived, 304s too), and is
    kept only fallback_expire seconds, so the first origin is asked again soon; fallback_expire 0 keeps none."""
    cache = MemcachedOriginals(MemcachedOptions(servers=(memcached_server,)), Limits(), NAMESPACE, fallback_expire=1)
    fresh = Original.from_bytes(b"fresh upload", fallback=True)
    cache.set("fallback.jpg", fresh)
    assert cache.get("fallback.jpg") == fresh and cache.head("fallback.jpg").fallback
    cache.set("primary.jpg", Original.from_bytes(b"in s3"))
    assert not cache.get("primary.jpg").fallback and not cache.head("primary.jpg").fallback
    time.sleep(2.1)  # memcached's clock ticks in whole seconds
    assert cache.get("fallback.jpg") is None and cache.get("primary.jpg") is not None
    unkept = MemcachedOriginals(MemcachedOptions(servers=(memcached_server,)), Limits(), NAMESPACE, fallback_expire=0)
    unkept.set("unkept.jpg", fresh)
    assert unkept.get("unkept.jpg") is None


class CountingOrigin:
    """An origin whose original for a key is the key's bytes; counts its fetches."""

    def __init__(self) -> None:
        self.calls = 0

    def fetch(self, key: str) -> Original:
        self.calls += 1
        return Original.from_bytes(key.encode())


def test_store_head_never_asks_the_origins(memcached_server: str) -> None:
    origin = CountingOrigin()

    assert OriginalStore(origin, None).head("store-digest") is None
    store = OriginalStore(origin, _cache(memcached_server), background=False)
    assert store.head("store-digest") is None and origin.calls == 0
    assert store.get("store-digest").digest == store.head("store-digest").digest and origin.calls == 1


def test_long_keys_with_spaces_are_safe(memcached_server: str) -> None:
    cache = _cache(memcached_server)
    key = "a folder/" + "very long name " * 60 + ".jpg"
    cache.set(key, Original.from_bytes(b"x"))
    assert cache.get(key) == Original.from_bytes(b"x")


def _wait_stopped(pid: int) -> None:
    """SIGSTOP is delivered asynchronously: wait until the kernel shows the process stopped ('T')."""
    deadline = time.monotonic() + 5
    while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
        assert time.monotonic() < deadline, "memcached did not stop"
        time.sleep(0.01)


def test_hung_or_dead_memcached_is_a_quick_miss(logs: Path) -> None:
    with support.memcached(logs) as (proc, address):
        cache = _cache(address, memcached_timeout=0.2)
        cache.set("k", Original.from_bytes(b"v"))
        os.kill(proc.pid, signal.SIGSTOP)  # hung: accepts nothing, answers nothing
        _wait_stopped(proc.pid)
        try:
            started = time.monotonic()
            assert cache.get("k") is None
            cache.set("k2", Original.from_bytes(b"v"))
            assert time.monotonic() - started < 3
        finally:
            os.kill(proc.pid, signal.SIGCONT)
    assert cache.get("k") is None  # now stopped altogether


def test_single_flight_shares_one_call_and_its_error() -> None:
    flight = SingleFlight()
    calls = 0
    gate = threading.Event()

    def slow() -> Original:
        nonlocal calls
        calls += 1
        gate.wait(5)
        return Original.from_bytes(b"once")

    results: list[Original] = []
    threads = [threading.Thread(target=lambda: results.append(flight.do("k", slow))) for _ in range(20)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    gate.set()
    for thread in threads:
        thread.join(5)
    assert calls == 1 and len(results) == 20 and {r.data for r in results} == {b"once"}

    def fail() -> Original:
        raise ValueError("shared")

    for _ in range(2):  # a failure is not remembered: the next call tries again
        try:
            flight.do("k", fail)
        except ValueError as exc:
            assert str(exc) == "shared"
        else:
            raise AssertionError("the error was swallowed")


def test_store_is_cache_aside(memcached_server: str) -> None:
    origin = CountingOrigin()

    cache = _cache(memcached_server)
    store = OriginalStore(origin, cache, background=False)
    assert store.get("store-key").data == b"store-key"
    assert OriginalStore(origin, cache).get("store-key").data == b"store-key"  # another instance: a hit
    assert origin.calls == 1


def test_originals_of_an_origin_with_memcached_off_are_not_stored(memcached_server: str, tmp_path: Path) -> None:
    """``memcached=off`` on an origin (a local folder): what it serves is never written to memcached, while the
    originals of the chain's other origins still are; a chain with no origin on needs no memcached at all."""
    (tmp_path / "local.jpg").write_bytes(b"on disk")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "remote.jpg").write_bytes(b"fetched")
    config = parse_config({"origins": [f"file://{tmp_path}"], "presets": {"s": {"width": 1}}}, {})
    local = make_origin(f"file://{tmp_path}?memcached=off", config)
    other = make_origin(f"file://{tmp_path}/elsewhere", config)
    cache = _cache(memcached_server)
    store = OriginalStore(OriginChain([local, other]), cache, background=False)
    assert store.get("local.jpg").data == b"on disk" and cache.get("local.jpg") is None
    assert store.get("remote.jpg").data == b"fetched" and cache.get("remote.jpg") == store.get("remote.jpg")
    assert OriginChain([local, other]).memcached and not OriginChain([local]).memcached
    with pytest.raises(ConfigError, match="memcached=on or memcached=off"):
        make_origin(f"file://{tmp_path}?memcached=no", config)


def test_store_writes_memcached_in_the_background(memcached_server: str) -> None:
    class Once:
        def fetch(self, key: str) -> Original:
            return Original.from_bytes(b"x" * 2_500_000)

    cache = _cache(memcached_server)
    original = OriginalStore(Once(), cache).get("background-key")
    deadline = time.monotonic() + 5
    while cache.get("background-key") != original:
        assert time.monotonic() < deadline, "the background store never landed"
        time.sleep(0.05)


def test_focus_travels_with_the_original(memcached_server: str) -> None:
    """The origin's focal point is kept in the head item: a render from memcached crops like one from the origin,
    and the head alone gives the version (digest and focus) that ETags are built from."""
    cache = _cache(memcached_server)
    focused = Original.from_bytes(b"same bytes", focus=(0.15, 0.85))
    cache.set("focused.jpg", focused)
    assert cache.get("focused.jpg") == focused
    assert cache.head("focused.jpg").version == focused.version == f"{focused.digest}@0.150000,0.850000"
    cache.set("focused.jpg", Original.from_bytes(b"same bytes"))  # the focus removed: the version follows
    assert cache.head("focused.jpg").version == focused.digest and cache.get("focused.jpg").focus is None
