"""What operators see, through the real stack: metrics (one scrape for every instance), request ids, Server-Timing,
JSON log lines, and /metrics and nginx's counters reachable from loopback only."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import gunicorn.glogging
import pytest
import requests
from gunicorn.config import Config

from service import gunicorn_conf
from service.launcher import Stack
from service.procs import free_port
from tests import support

TIMING = re.compile(r"^(?P<name>[a-z]+);dur=(?P<ms>\d+(?:\.\d+)?)$")


@pytest.fixture(scope="module")
def fallback() -> Iterator[support.CountingProxy]:
    """The second origin, asked for keys the folder lacks: 404 for every key, until a test makes it fail."""
    proxy = support.CountingProxy()
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def stack(corpus: Path, tmp_path_factory: pytest.TempPathFactory, fallback: support.CountingProxy) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("observe")
    folder = state / "originals"
    folder.mkdir()
    for i in range(7):  # photo-6 is kept for the Server-Timing test: its first request decodes
        (folder / f"photo-{i}.jpg").write_bytes((corpus / "16_storm_720_30k.jpg").read_bytes() + bytes([i]))
    env = {"PHIZER_ORIGINS": f"file://{folder},{fallback.url}", "PHIZER_ALLOW_PRIVATE_ORIGINS": "1"}
    with Stack(state, port=free_port(), instances=2, env=env) as started:
        yield started


def app_log_lines(stack: Stack) -> list[dict]:
    """Every line of every instance's log, each one JSON object (the app's and gunicorn's own alike)."""
    time.sleep(0.3)  # an instance logs just after answering
    return [json.loads(line) for log in stack.logs.glob("app-*.log") for line in log.read_text().splitlines()]


def test_gunicorns_own_lines_are_json_like_the_apps(stack: Stack) -> None:
    """An operator's log pipeline reads one format: gunicorn's start-up lines too (service/logs.py)."""
    messages = [line.get("msg", "") for line in app_log_lines(stack)]
    assert sum(m.startswith("Booting worker with pid") for m in messages) == 2, messages
    assert sum(m.startswith("Starting gunicorn") for m in messages) == 2, messages
    # Each worker froze the loaded app's objects (service/gunicorn_conf.py: no long collector pauses).
    frozen = [int(m.split()[2]) for m in messages if m.startswith("App loaded: ")]
    assert len(frozen) == 2 and min(frozen) > 10_000, messages


def test_counters_and_histograms_move_across_every_instance(stack: Stack, fallback: support.CountingProxy) -> None:
    before = support.metrics(stack.url)
    for family, label, values in (
        ("phizer_originals_total", "outcome", ("memcached", "origin")),
        ("phizer_intermediates_total", "outcome", ("hit", "miss")),
        ("phizer_origin_errors_total", "kind", ("timeout", "failure")),
    ):  # in the first scrape already, at 0 (the stack served nothing yet)
        assert all(before.get((family, frozenset({(label, value)}))) == 0 for value in values), family
    instances = set()
    for i in range(6):
        response = requests.get(f"{stack.url}/small/photo-{i}.jpg", headers={"Accept": "image/jpeg"}, timeout=30)
        assert response.status_code == 200
        instances.add(response.headers["X-Phizer-Instance"])
    assert requests.get(f"{stack.url}/small/missing.jpg", timeout=30).status_code == 404
    fallback.status = 500  # the fallback origin fails: a 502, counted as an origin error
    try:
        broken = requests.get(f"{stack.url}/small/broken.jpg", timeout=30)
    finally:
        fallback.status = None
    assert (broken.status_code, broken.text) == (502, "origin failed\n")  # the detail is logged, never shown
    for i in range(2):  # the same original at another preset: memcached or the kept decode (intermediate) answer
        assert requests.get(f"{stack.url}/medium/photo-{i}.jpg", timeout=30).status_code == 200
    def moved(name: str, **labels: str) -> float:
        return support.metric(after, name, **labels) - support.metric(before, name, **labels)

    deadline = time.monotonic() + 10
    while True:  # an answer's metrics are written just after it is sent (service/app.py's _AfterResponse)
        after = support.metrics(stack.url)
        if moved("phizer_requests_total", preset="medium", format="jpeg", status="200") >= 2:
            break
        assert time.monotonic() < deadline, "the last answers were never counted"
        time.sleep(0.05)

    assert len(instances) == 2  # the scrape below covers both
    logged = next(line for line in app_log_lines(stack) if line.get("request_id") == broken.headers["X-Request-ID"])
    assert (logged["status"], logged["path"], logged["key"]) == (502, "/small/broken.jpg", "broken.jpg")
    assert logged["bytes"] == len(broken.content)
    assert fallback.url in logged["detail"] and "HTTP 500" in logged["detail"]
    assert moved("phizer_requests_total", preset="small", format="jpeg", status="200") == 6
    assert moved("phizer_requests_total", preset="small", format="", status="404") == 1
    assert moved("phizer_requests_total", preset="small", format="", status="502") == 1
    assert moved("phizer_originals_total", outcome="origin") >= 6
    assert moved("phizer_originals_total", outcome="memcached") >= 1  # medium: stored in memcached by small
    for stage in ("original", "memcached", "fetch", "decode", "resize", "encode", "wait"):
        assert moved("phizer_stage_seconds_count", stage=stage) >= 2, stage
        assert support.metric(after, "phizer_stage_seconds_bucket", stage=stage, le="+Inf") >= 6, stage
    assert moved("phizer_origin_errors_total", kind="failure") == 1
    hits, misses = (moved("phizer_intermediates_total", outcome=outcome) for outcome in ("hit", "miss"))
    assert misses >= 6 and hits + misses == 8, (hits, misses)
    # Nothing renders or waits once the answers are in; no request was shed or past its deadline (test_overload.py
    # makes those move).
    for gauge in ("phizer_renders_in_flight", "phizer_renders_queued", "phizer_shed_total", "phizer_deadlines_total"):
        assert (gauge, frozenset()) in after and support.metric(after, gauge) == 0, gauge


def test_request_id_and_server_timing(stack: Stack) -> None:
    mine = requests.get(f"{stack.url}/small/photo-0.jpg", headers={"X-Request-ID": "trace-42"}, timeout=30)
    assert mine.headers["X-Request-ID"] == "trace-42"
    fresh = requests.get(f"{stack.url}/medium/photo-6.jpg", headers={"X-Request-ID": "bad id\\x"}, timeout=30)
    rid = fresh.headers["X-Request-ID"]
    assert rid != "bad id\\x" and re.fullmatch(r"[0-9a-f]{32}", rid)  # nginx's own $request_id
    timings = {}
    for part in fresh.headers["Server-Timing"].split(", "):
        match = TIMING.match(part)
        assert match, part
        timings[match["name"]] = float(match["ms"])
    assert {"original", "decode", "resize", "encode", "total"} <= set(timings)
    assert timings["total"] >= timings["decode"]
    again = requests.get(f"{stack.url}/medium/photo-6.jpg", timeout=30)
    assert again.headers["X-Cache-Status"] == "HIT" and "Server-Timing" not in again.headers  # nothing rendered now
    logged = next(line for line in app_log_lines(stack) if line.get("request_id") == rid)
    assert (logged["preset"], logged["key"], logged["status"], logged["format"]) == (
        "medium",
        "photo-6.jpg",
        200,
        "jpeg",
    )
    assert logged["bytes"] == len(fresh.content) and logged["original"] in ("origin", "memcached")
    assert set(logged["stages_ms"]) >= {"decode", "encode"}
    assert rid in stack.access_log.read_text()


def test_every_response_carries_the_request_id_and_server_timing(stack: Stack) -> None:
    """Every response of an instance (health, metrics, the gallery, an error) has Server-Timing and the request's
    id; nginx's own answers (a refused method, a cached answer, which no render timed) carry the id too."""
    for path in ("/healthz", "/readyz", "/metrics", "/presets.json", "/", "/small/missing.jpg", "/small/photo-1.jpg"):
        response = requests.get(stack.url + path, headers={"X-Request-ID": "trace-43"}, timeout=30)
        assert response.headers["X-Request-ID"] == "trace-43", path
        if response.headers["X-Cache-Status"] == "HIT":  # asked by an earlier test
            assert "Server-Timing" not in response.headers, path
            continue
        parts = response.headers["Server-Timing"].split(", ")
        assert all(TIMING.match(part) for part in parts) and parts[-1].startswith("total;"), (path, parts)
    refused = requests.delete(stack.url + "/small/photo-1.jpg", headers={"X-Request-ID": "trace-44"}, timeout=10)
    assert refused.status_code == 405 and refused.headers["X-Request-ID"] == "trace-44"
    assert refused.headers["X-Cache-Status"] == "BYPASS"


def get_from(stack: Stack, source: str, path: str) -> int:
    """GET through nginx from the local address ``source`` (another loopback address is not 127.0.0.1)."""
    sock = socket.create_connection(("127.0.0.1", stack.port), timeout=10, source_address=(source, 0))
    conn = http.client.HTTPConnection("127.0.0.1", stack.port, timeout=10)
    conn.sock = sock
    conn.request("GET", path)
    status = conn.getresponse().status
    conn.close()
    return status


def test_metrics_and_nginx_status_are_for_loopback_only(stack: Stack) -> None:
    assert get_from(stack, "127.0.0.1", "/metrics") == 200
    assert get_from(stack, "127.0.0.1", "/nginx_status") == 200
    assert "Active connections" in requests.get(stack.url + "/nginx_status", timeout=10).text
    assert get_from(stack, "127.0.0.2", "/metrics") == 403  # any other address: denied
    assert get_from(stack, "127.0.0.2", "/nginx_status") == 403
    assert get_from(stack, "127.0.0.2", "/small/photo-0.jpg") == 200  # images are for everyone


def test_readyz_follows_memcached_and_the_origins(tmp_path: Path) -> None:
    """Ready with memcached and S3 answering; unready (503, one line naming what) with both frozen; ready again
    after, with nothing restarted by hand. /healthz (liveness, no I/O) stays 200 throughout."""
    with support.moto_s3(tmp_path) as endpoint:
        support.s3_client(endpoint).create_bucket(Bucket="ready")
        moto = support.pid_of(["moto_server", endpoint.rsplit(":", 1)[1]])
        env = {**support.AWS_ENV, "AWS_ENDPOINT_URL": endpoint, "PHIZER_ORIGINS": "s3://ready"}
        with Stack(tmp_path / "state", port=free_port(), instances=1, env=env) as stack:
            assert stack.memcached is not None
            ready = requests.get(stack.url + "/readyz", timeout=10)
            assert (ready.status_code, ready.text, ready.headers["X-Cache-Status"]) == (200, "ready\n", "BYPASS")
            for pid in (stack.memcached.pid, moto):
                os.kill(pid, signal.SIGSTOP)
            try:
                down = requests.get(stack.url + "/readyz", timeout=10)
                assert down.status_code == 503
                assert down.text == "not ready: unreachable 1 of 1 memcached servers, origin 1 (s3)\n"
                assert requests.get(stack.url + "/healthz", timeout=10).status_code == 200
            finally:
                for pid in (stack.memcached.pid, moto):
                    os.kill(pid, signal.SIGCONT)
            assert requests.get(stack.url + "/readyz", timeout=10).status_code == 200


def test_gunicorn_builds_no_access_log_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    """gunicorn's access log is off (nginx and the app log each request), and its workers never build a request's
    log atoms for it: gunicorn counts the logconfig_dict as asking for one (service/logs.py's GunicornLogger)."""
    cfg = Config()
    for name in ("logger_class", "logconfig_dict", "accesslog", "errorlog", "loglevel"):
        cfg.set(name, getattr(gunicorn_conf, name))

    def atoms(*args: object) -> dict:
        raise AssertionError("a request's access log atoms were built")

    monkeypatch.setattr(gunicorn.glogging.Logger, "atoms", atoms)
    with pytest.raises(AssertionError):  # gunicorn's own logger would build them with this configuration
        gunicorn.glogging.Logger(cfg).access(None, None, {}, 0)
    logger = cfg.logger_class(cfg)
    assert not logger.access_log_enabled
    logger.access(None, None, {}, 0)
