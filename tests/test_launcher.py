"""The launcher from the outside: the template renders for other callers, `make run` serves the samples and
SIGTERM leaves nothing behind, and the two-stack CLI shares one memcached."""

from __future__ import annotations

import io
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import jinja2
import pytest
import requests
from PIL import Image

from service.config import load_config
from service.launcher import Stack, _hints
from service.nginx_conf import config_vars, render_nginx_conf
from service.procs import free_port
from tests.support import REPO

# The samples' upright sizes (wine is stored sideways with EXIF orientation 6).
SAMPLES = {"storm.jpg": (1920, 1280), "wine-exif-orientation-6.jpg": (2560, 3837)}


def expected_size(size: tuple[int, int], preset: dict[str, Any]) -> tuple[int, int]:
    """The rendition size per /presets.json: ``cover`` and ``pad`` are the box, ``contain`` the largest fit inside."""
    width, height = size
    if preset["fit"] in ("cover", "pad"):
        return preset["width"], preset["height"]
    scales = [box / side for box, side in ((preset["width"], width), (preset["height"], height)) if box]
    scale = min(scales) if preset["upscale"] else min([*scales, 1.0])
    return max(1, round(width * scale)), max(1, round(height * scale))


def test_template_renders_for_a_deployment(tmp_path: Path) -> None:
    """The variables Ansible sets (all interface, TCP instances, own user, log and cache folders) give a
    config nginx accepts; a required variable left out is an error, not an empty directive."""
    conf = tmp_path / "nginx.conf"
    conf.write_text(
        render_nginx_conf(
            **config_vars(load_config(environ={})),
            state_dir=str(tmp_path),
            listen="0.0.0.0:8080",
            upstreams=["127.0.0.1:9001", "127.0.0.1:9002"],
            user="www-data",
            worker_processes=2,
            log_dir=str(tmp_path / "log"),
            cache_dir=str(tmp_path / "cache"),
            cache_max_size="10g",
            cache_inactive="7d",
        )
    )
    (tmp_path / "log").mkdir()
    text = conf.read_text()
    assert "server 127.0.0.1:9002 " in text and "user www-data;" in text
    assert '~ "^/(?:thumb|small|medium|large)/."' in text
    check = subprocess.run(
        ["nginx", "-t", "-p", str(tmp_path), "-c", str(conf), "-e", str(tmp_path / "log" / "error.log")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert check.returncode == 0, check.stderr
    with pytest.raises(jinja2.UndefinedError):
        render_nginx_conf(state_dir="/x", listen="127.0.0.1:1", upstreams=["127.0.0.1:1"], presets=["small"])


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` right now (by parent pid, from /proc)."""
    children: dict[int, list[int]] = defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children[ppid].append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children[todo.pop()]:
            found.add(child)
            todo.append(child)
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@contextmanager
def foreground(argv: list[str], env: dict[str, str], ready: str, timeout: float) -> Iterator[list[str]]:
    """Run ``argv`` as a user would in a terminal; once it printed ``ready``, yield its output lines; then
    SIGTERM it and check that it, and every process it had started, is gone, with no socket left."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PHIZER_")}
    proc = subprocess.Popen(
        argv, cwd=REPO, env={**clean, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: queue.Queue[str] = queue.Queue()
    output: list[str] = []
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout or []], daemon=True).start()
    try:
        while not any(ready in line for line in output):
            try:
                output.append(lines.get(timeout=timeout))
            except queue.Empty:
                pytest.fail(f"{argv} did not print {ready!r} in {timeout}s: {''.join(output)}")
        started = descendants(proc.pid)
        assert started, "nothing was started"
        yield output
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert [pid for pid in started if running(pid)] == []
    state = Path(env["PHIZER_STATE_DIR"])
    assert list(state.rglob("*.sock")) == [] and list(state.rglob("nginx.pid")) == []


def test_make_run_serves_every_preset_and_stops_clean(tmp_path: Path) -> None:
    port = free_port()
    env = {"PHIZER_PORT": str(port), "PHIZER_STATE_DIR": str(tmp_path / "state"), "PHIZER_INSTANCES": "2"}
    with foreground(["make", "run"], env, "Ctrl-C stops everything", timeout=300):
        base = f"http://127.0.0.1:{port}"
        presets = requests.get(base + "/presets.json", timeout=10).json()
        for name, size in SAMPLES.items():
            for preset, definition in presets.items():
                response = requests.get(f"{base}/{preset}/{name}", timeout=60)
                assert response.status_code == 200, response.text
                with Image.open(io.BytesIO(response.content)) as image:
                    assert image.size == expected_size(size, definition), (preset, name)
        again = requests.get(f"{base}/{preset}/{name}", timeout=10)
        assert (response.headers["X-Cache-Status"], again.headers["X-Cache-Status"]) == ("MISS", "HIT")


def test_cli_second_stack_shares_the_first_stacks_memcached(tmp_path: Path) -> None:
    port = next(p for p in iter(free_port, None) if _free(p + 1))
    env = {"PHIZER_STATE_DIR": str(tmp_path / "state")}
    argv = [sys.executable, "-m", "service.launcher", "--stacks", "2", "--instances", "1", "--port", str(port)]
    with foreground(argv, env, "Ctrl-C stops everything", timeout=60) as output:
        for base in (f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port + 1}"):
            assert requests.get(base + "/small/storm-small.jpg", timeout=30).status_code == 200
        pools = [line.split("memcached ")[1].split(",")[0] for line in output if line.startswith("phizer is up")]
        assert len(pools) == 2 and pools[0] == pools[1] and pools[0].startswith("127.0.0.1:")
    assert [p.name for p in (tmp_path / "state").rglob("memcached.log")] == ["memcached.log"]


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def test_the_first_url_printed_is_the_gallery_when_it_is_on(tmp_path: Path) -> None:
    """What `make run` prints first: the gallery, whatever the origin; not when the config turns it off."""
    config = tmp_path / "config.yaml"
    config.write_text(f"origins: [file://{tmp_path}]\npresets: {{small: {{width: 320}}}}\ngallery: false\n")
    for env, first in (
        ({}, "open: http://127.0.0.1:8080/   (the gallery"),  # the bundled samples
        ({"PHIZER_ORIGINS": f"file://{tmp_path}"}, "open: http://127.0.0.1:8080/   (the gallery"),
        ({"PHIZER_CONFIG": str(config)}, "presets: http://127.0.0.1:8080/presets.json"),
    ):
        stack = Stack(tmp_path / "state", port=8080, env=env)
        assert _hints(stack).splitlines()[0].startswith(first), env
