"""The Ansible deployment, linted and then run for real against two fresh Debian roots (tests/chroot_host.py).

Both roots are converged by one inventory built on ansible/inventories/example (its group_vars, so the example
is exercised too; only what must differ on one machine is overridden per host: ports, the chroot connection,
the S3 endpoint). Then: a second converge must change nothing, systemd-analyze must find nothing to say about
the installed units, and the services started from those units must serve an image from an S3 server on this
machine through each host's nginx, with the two hosts sharing one memcached pool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
import yaml
from PIL import Image

from service.launcher import instance_ready
from service.procs import free_port, http_ready, tcp_ready
from tests import support
from tests.chroot_host import CACHE, ChrootHost, Unit

ANSIBLE = support.REPO / "ansible"
EXAMPLE = ANSIBLE / "inventories" / "example"
BUCKET = "phizer-deploy"
HOSTS = ("host-a", "host-b")
INSTANCES = 2
PHOTO = "04_picos_8mp_progressive.jpg"  # 1.8 MB: stored in memcached as several chunks
WHEEL_DIR = "/var/cache/phizer/wheels"  # the phizer role's phizer_wheel_dir
RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)
UNITS = ("phizer@.service", "phizer.target", "memcached.service", "nginx.service")

pytestmark = [
    pytest.mark.skipif(os.geteuid() != 0, reason="debootstrap, chroot and mount need root"),
    pytest.mark.timeout(1200),  # the first run also debootstraps (about 90 s) and fills the download caches
]


def _ansible_env(home: Path) -> dict[str, str]:
    """This machine's environment minus its pip settings, which the chroot connection would pass to the roots."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "ANSIBLE_CONFIG": str(ANSIBLE / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOME": str(home)}


def _run_ansible_tool(argv: list[str], tmp_path: Path, timeout: int) -> None:
    """Run one of the venv's Ansible tools from the checkout; fail with the end of its output."""
    result = subprocess.run(
        [str(support.VENV_BIN / argv[0]), *argv[1:]],
        cwd=support.REPO,
        env=_ansible_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_lint_production_profile(tmp_path: Path) -> None:
    _run_ansible_tool(["ansible-lint", "--offline", "--profile", "production", "ansible"], tmp_path, 300)


def test_syntax_check(tmp_path: Path) -> None:
    _run_ansible_tool(
        ["ansible-playbook", "--syntax-check", "-i", str(EXAMPLE), str(ANSIBLE / "site.yml")], tmp_path, 120
    )


@dataclasses.dataclass
class Deployment:
    hosts: dict[str, ChrootHost]
    urls: dict[str, str]  # each host's nginx
    memcached: dict[str, str]  # each host's memcached node, host:port
    recaps: list[dict[str, dict[str, int]]]  # per converge: host -> ok/changed/unreachable/failed
    s3: support.CountingProxy  # every S3 request of the hosts passes here


def _wheel_cache() -> Path:
    """Where the pillow-simd wheel a host built is kept for later runs, keyed by what the build depends on.

    The CPU flavour (an AVX2 build must not reach a CPU without it), the phizer role (its Debian packages and
    build command) and requirements.txt: any change there makes the next run compile again, on each host.
    """
    flavour = "avx2" if "avx2" in Path("/proc/cpuinfo").read_text().split() else "generic"
    digest = hashlib.sha256()
    for path in ("ansible/roles/phizer/defaults/main.yml", "ansible/roles/phizer/tasks/main.yml", "requirements.txt"):
        digest.update((support.REPO / path).read_bytes())
    return CACHE / "wheels" / f"{flavour}-{digest.hexdigest()[:12]}"


def _snapshot(folder: Path) -> Path:
    """The files the roles deploy, copied once: edits to the work tree during the test cannot change them."""
    for name in ("service", "nginx"):
        shutil.copytree(support.REPO / name, folder / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("requirements.txt", "constraints.txt"):
        shutil.copy2(support.REPO / name, folder / name)
    return folder


def _inventory(folder: Path, hosts: dict[str, ChrootHost], s3_url: str) -> tuple[Path, dict, dict]:
    shutil.copytree(EXAMPLE / "group_vars", folder / "group_vars")
    checkout = _snapshot(folder / "checkout")
    nginx_ports = {name: free_port() for name in hosts}
    memcached_ports = {name: free_port() for name in hosts}
    wheels = _wheel_cache()
    prebuilt = str(wheels) if any(wheels.glob("pillow_simd-*.whl")) else ""
    host_vars = {
        name: {
            "ansible_connection": "community.general.chroot",
            "ansible_host": str(host.root),
            "phizer_src": str(checkout),
            "nginx_template": str(checkout / "nginx" / "nginx.conf.j2"),
            "memcached_address": "127.0.0.1",
            "memcached_port": memcached_ports[name],
            "memcached_memory_mb": 64,
            "nginx_listen": f"127.0.0.1:{nginx_ports[name]}",
            "nginx_cache_max_size": "100m",
            "phizer_instances": INSTANCES,
            "phizer_instance_header": True,  # the tests check which host's instance answered (off by default)
            "phizer_origins": [f"s3://{BUCKET}"],
            "phizer_environment": {**support.AWS_ENV, "AWS_ENDPOINT_URL": s3_url},
            # The first run (and any run after the build's inputs changed) compiles pillow-simd on each host;
            # later runs hand the hosts the wheel kept from it, through the role's own prebuilt-wheel path.
            "phizer_prebuilt_wheels": prebuilt,
        }
        for name, host in hosts.items()
    }
    groups = {group: {"hosts": dict.fromkeys(hosts)} for group in ("memcached", "app", "nginx")}
    path = folder / "hosts.yml"
    path.write_text(yaml.safe_dump({"all": {"hosts": host_vars, "children": groups}}))
    urls = {name: f"http://127.0.0.1:{port}" for name, port in nginx_ports.items()}
    return path, urls, {name: f"127.0.0.1:{port}" for name, port in memcached_ports.items()}


def _converge(inventory: Path, log: Path, home: Path) -> dict[str, dict[str, int]]:
    with open(log, "w") as out:
        result = subprocess.run(
            [str(support.VENV_BIN / "ansible-playbook"), "-i", str(inventory), str(ANSIBLE / "site.yml")],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=_ansible_env(home),
            timeout=900,
            check=False,
        )
    text = log.read_text()
    assert result.returncode == 0, f"ansible-playbook exited {result.returncode} (log {log}):\n{text[-6000:]}"
    return {m["host"]: {k: int(v) for k, v in m.groupdict().items() if k != "host"} for m in RECAP.finditer(text)}


def _start_services(host: ChrootHost, memcached: str) -> None:
    """memcached, the instances, then nginx: each from its installed unit, each waited for."""
    host_part, port = memcached.rsplit(":", 1)
    host.start_unit("memcached.service").wait_ready(tcp_ready(host_part, int(port)), timeout=20)
    for i in range(INSTANCES):
        sock = host.root / "run" / "phizer" / str(i) / "app.sock"
        host.start_unit("phizer@.service", str(i)).wait_ready(instance_ready(sock), timeout=60)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory, s3_endpoint: str, logs: Path) -> Iterator[Deployment]:
    base = tmp_path_factory.mktemp("deploy")
    hosts = {name: ChrootHost(base / name, logs) for name in HOSTS}
    s3 = support.CountingProxy(upstream=s3_endpoint)
    support.s3_client(s3_endpoint).create_bucket(Bucket=BUCKET)
    try:
        started = time.monotonic()
        for host in hosts.values():
            host.create()
        inventory, urls, memcached = _inventory(base, hosts, s3.url)
        recaps = []
        for run in (1, 2):
            recaps.append(_converge(inventory, logs / f"converge-{run}.log", base / "ansible-home"))
            print(f"converge {run}: {recaps[-1]} after {time.monotonic() - started:.0f} s")
        for host in hosts.values():
            host.keep_downloads()
        wheels = _wheel_cache()
        wheels.mkdir(parents=True, exist_ok=True)
        for wheel in (hosts[HOSTS[0]].root / WHEEL_DIR.lstrip("/")).glob("pillow_simd-*.whl"):
            shutil.copy2(wheel, wheels / wheel.name)
        for name, host in hosts.items():
            _start_services(host, memcached[name])
            host.start_unit("nginx.service").wait_ready(http_ready(urls[name] + "/healthz"), timeout=20)
        print(f"deployed and started in {time.monotonic() - started:.0f} s")
        yield Deployment(hosts, urls, memcached, recaps, s3)
    finally:
        s3.close()
        for host in hosts.values():
            host.close()


def test_converges_then_changes_nothing(deployment: Deployment) -> None:
    first, second = deployment.recaps
    for name in HOSTS:
        assert first[name]["changed"] > 0 and first[name]["failed"] == 0
        assert second[name]["changed"] == 0, f"second converge changed {second[name]} on {name}"
        assert second[name]["failed"] == second[name]["unreachable"] == 0


def test_units_verify_cleanly(deployment: Deployment) -> None:
    for host in deployment.hosts.values():
        result = host.run("systemd-analyze", "verify", "--man=no", *UNITS)
        assert (result.returncode, result.stdout + result.stderr) == (0, "")
        enabled = host.root / "etc/systemd/system/phizer.target.wants"
        assert sorted(p.name for p in enabled.iterdir()) == [f"phizer@{i}.service" for i in range(INSTANCES)]
        instance = Unit(host.root, "phizer@.service", "0")
        hardening = {"User": "phizer", "Restart": "on-failure", "NoNewPrivileges": "yes", "ProtectSystem": "strict"}
        assert {key: instance.one(key) for key in hardening} == hardening


def test_deployed_pil_is_the_simd_build(deployment: Deployment) -> None:
    for host in deployment.hosts.values():
        result = host.run("/opt/phizer/venv/bin/python", "-c", "import PIL; print(PIL.__version__)")
        assert ".post" in result.stdout, result.stdout + result.stderr


def test_every_host_uses_the_whole_memcached_pool(deployment: Deployment) -> None:
    pool = ",".join(deployment.memcached[name] for name in HOSTS)
    for host in deployment.hosts.values():
        assert f"PHIZER_MEMCACHED={pool}\n" in (host.root / "etc/phizer/phizer.env").read_text()


def _put(s3_endpoint: str, original: Path, key: str) -> tuple[int, int]:
    data = original.read_bytes()
    support.s3_client(s3_endpoint).put_object(Bucket=BUCKET, Key=key, Body=data)
    return Image.open(io.BytesIO(data)).size


def test_nginx_serves_an_s3_original_miss_then_hit(deployment: Deployment, s3_endpoint: str, corpus: Path) -> None:
    width, height = _put(s3_endpoint, corpus / PHOTO, "a/photo.jpg")
    url = deployment.urls[HOSTS[0]] + "/small/a/photo.jpg"
    first, second = (requests.get(url, timeout=60) for _ in range(2))
    assert (first.status_code, first.headers["X-Cache-Status"]) == (200, "MISS"), first.text
    assert first.headers["X-Phizer-Instance"].startswith(f"{HOSTS[0]}-")
    assert Image.open(io.BytesIO(first.content)).size == (320, round(height * 320 / width))
    assert (second.headers["X-Cache-Status"], second.content) == ("HIT", first.content)


def test_second_host_takes_the_original_from_the_shared_pool(
    deployment: Deployment, s3_endpoint: str, corpus: Path
) -> None:
    width, height = _put(s3_endpoint, corpus / PHOTO, "shared/photo.jpg")
    a = requests.get(deployment.urls[HOSTS[0]] + "/thumb/shared/photo.jpg", timeout=60)
    assert a.status_code == 200 and Image.open(io.BytesIO(a.content)).size == (150, 150), a.text
    assert deployment.s3.gets[f"/{BUCKET}/shared/photo.jpg"] >= 1  # host-a fetched it from S3
    s3_gets = deployment.s3.total()
    b = requests.get(deployment.urls[HOSTS[1]] + "/medium/shared/photo.jpg", timeout=60)
    assert (b.status_code, b.headers["X-Cache-Status"]) == (200, "MISS"), b.text
    assert b.headers["X-Phizer-Instance"].startswith(f"{HOSTS[1]}-")
    assert Image.open(io.BytesIO(b.content)).size == (800, round(height * 800 / width))
    assert deployment.s3.total() == s3_gets, f"host-b asked S3: {deployment.s3.gets}"
