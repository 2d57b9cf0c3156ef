"""The originals cache against a real memcached, and single-flight under real concurrency."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from service.cache import MemcachedOriginals, OriginalStore, SingleFlight, cache_key
from service.config import MemcachedOptions
from service.origins import Original
from tests import support


def test_large_original_round_trips_in_chunks(memcached_server: str) -> None:
    cache = MemcachedOriginals(MemcachedOptions(servers=(memcached_server,)), timeout=1.0)
    original = Original.from_bytes(os.urandom(3_500_000))  # over memcached's default 1 MiB item limit
    assert cache.get("big.jpg") is None
    cache.set("big.jpg", original)
    assert cache.get("big.jpg") == original
    # A lost chunk (eviction) is a miss, never a truncated original.
    cache.client.delete(f"{cache_key('big.jpg')}:{original.digest[:16]}:2")
    assert cache.get("big.jpg") is None


def test_long_keys_with_spaces_are_safe(memcached_server: str) -> None:
    cache = MemcachedOriginals(MemcachedOptions(servers=(memcached_server,)), timeout=1.0)
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
        cache = MemcachedOriginals(MemcachedOptions(servers=(address,)), timeout=0.2)
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
    class Counting:
        calls = 0

        def fetch(self, key: str) -> Original:
            Counting.calls += 1
            return Original.from_bytes(key.encode())

    cache = MemcachedOriginals(MemcachedOptions(servers=(memcached_server,)), timeout=1.0)
    store = OriginalStore(Counting(), cache, background=False)
    assert store.get("store-key").data == b"store-key"
    assert OriginalStore(Counting(), cache).get("store-key").data == b"store-key"  # another instance: a hit
    assert Counting.calls == 1


def test_store_writes_memcached_in_the_background(memcached_server: str) -> None:
    class Once:
        def fetch(self, key: str) -> Original:
            return Original.from_bytes(b"x" * 2_500_000)

    cache = MemcachedOriginals(MemcachedOptions(servers=(memcached_server,)), timeout=1.0)
    original = OriginalStore(Once(), cache).get("background-key")
    deadline = time.monotonic() + 5
    while cache.get("background-key") != original:
        assert time.monotonic() < deadline, "the background store never landed"
        time.sleep(0.05)
