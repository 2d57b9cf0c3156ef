"""The Ansible deployment, linted and then run for real against two fresh Debian roots (tests/chroot_host.py).

Both roots are converged by one inventory built on ansible/inventories/example (its group_vars, so the example
is exercised too; only what must differ on one machine is overridden per host: ports, the chroot connection,
the S3 endpoint). Then: a second converge must change nothing, systemd-analyze must find nothing to say about
the installed units and rate their exposure within bounds, memcached's firewall must parse and, loaded in a
network namespace of its own, let in only the app hosts, and the services started from those units (under
their seccomp and capability settings, see tests/chroot_host.py) must serve an image from an S3 server on this
machine through each host's nginx, with the two hosts sharing one memcached pool.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
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
from tests.chroot_host import CACHE, CAPABILITIES, ChrootHost, Unit

ANSIBLE = support.REPO / "ansible"
EXAMPLE = ANSIBLE / "inventories" / "example"
BUCKET = "phizer-deploy"
HOSTS = ("host-a", "host-b")
CLIENT_ADDRESSES = {"host-a": "127.0.0.11", "host-b": "127.0.0.12"}  # each app host's memcached_client_address
INSTANCES = 2
PHOTO = "04_picos_8mp_progressive.jpg"  # 1.8 MB: stored in memcached as several chunks
WHEEL_DIR = "/var/cache/phizer/wheels"  # the phizer role's phizer_wheel_dir
RECAP = re.compile(
    r"^(?P<host>\S+)\s+:\s+ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)
UNITS = (
    "phizer@.service",
    "phizer.target",
    "memcached.service",
    "phizer-memcached-firewall.service",
    "nginx.service",
)
# systemd-analyze security's overall exposure (0 = fully locked down, 10 = unprotected), per unit: the most each may
# reach, which is what systemd 252 rates the units at now (nginx's master runs as root, with the capabilities to
# bind and to hand its workers their user; the firewall unit runs as root with CAP_NET_ADMIN): any setting taken
# away fails the test.
EXPOSURE = {
    "phizer@0.service": 1.5,
    "memcached.service": 1.4,
    "nginx.service": 2.5,
    "phizer-memcached-firewall.service": 2.5,
}
NFT_FILE = "/etc/nftables.d/phizer-memcached.nft"  # the memcached role's memcached_nft_file
PHASES = (("start", "ExecStart"), ("reload", "ExecReload"), ("stop", "ExecStop"))  # of its firewall unit

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
            # What memcached's firewall lets in (the converge does not load it: no systemd). Loopback addresses of
            # their own, so that test_memcached_firewall_lets_in_only_the_app_hosts can connect from them.
            "memcached_client_address": CLIENT_ADDRESSES[name],
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
        hardening = {
            "User": "phizer",
            "Restart": "on-failure",
            "NoNewPrivileges": "yes",
            "ProtectSystem": "strict",
            "MemoryDenyWriteExecute": "yes",
            "MemoryMax": "1536M",  # the phizer role's phizer_memory_max
        }
        assert {key: instance.one(key) for key in hardening} == hardening
        # The graceful recycle (service/gunicorn_conf.py) comes first, below MemoryMax.
        assert "PHIZER_MAX_REQUESTS=5000 PHIZER_MAX_RSS_MB=1024" in instance.settings["Environment"]


def test_services_run_under_their_units_seccomp_and_capability_settings(deployment: Deployment) -> None:
    """What the harness applies (tests/chroot_host.py), checked on the running main processes: the requests the
    other tests make are served under the units' system call, address family and memory rules."""
    for host in deployment.hosts.values():
        for process in host.processes:
            lines = Path(f"/proc/{process.pid}/status").read_text().splitlines()
            status = {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}
            unit = Unit(host.root, re.sub(r"@[^.]*\.", "@.", process.name))  # phizer@0.service: phizer@.service
            assert (status["NoNewPrivs"], status["Seccomp"]) == ("1", "2"), process.name
            assert status["Seccomp_filters"] == "3", process.name  # address families, W^X memory, system calls
            kept = {CAPABILITIES[name] for name in unit.one("CapabilityBoundingSet").split()}
            assert int(status["CapBnd"], 16) == sum(1 << cap for cap in kept), process.name


def test_units_exposure_within_bounds(deployment: Deployment) -> None:
    """systemd-analyze security, offline, inside the root: the hardening of each unit as systemd rates it."""
    host = deployment.hosts[HOSTS[0]]
    scores = {}
    for unit in EXPOSURE:
        result = host.run("systemd-analyze", "security", "--offline=yes", "--no-pager", unit)
        found = re.search(rf"Overall exposure level for {re.escape(unit)}: (\d+\.\d+)", result.stdout)
        assert result.returncode == 0 and found, result.stdout[-2000:] + result.stderr[-2000:]
        scores[unit] = float(found[1])
    print(f"systemd-analyze security exposure: {scores}")
    assert all(scores[unit] <= most for unit, most in EXPOSURE.items()), (scores, EXPOSURE)


def test_memcached_firewall_rule_set_parses_and_lists_the_app_hosts(deployment: Deployment) -> None:
    for name, host in deployment.hosts.items():
        result = host.run("nft", "-c", "-f", NFT_FILE)
        assert (result.returncode, result.stderr) == (0, ""), result.stdout
        rules = (host.root / NFT_FILE.lstrip("/")).read_text()
        elements = dict(re.findall(r"set (clients_v[46]) \{[^}]*elements = \{ ([^}]*) \}", rules))
        assert sorted(elements["clients_v4"].split(", ")) == sorted(["127.0.0.1", *CLIENT_ADDRESSES.values()])
        assert elements["clients_v6"] == "::1"
        port = deployment.memcached[name].rsplit(":", 1)[1]
        assert f"th dport {port} jump memcached" in rules


# Run in a network namespace of its own (unshare -n), so the rules touch nothing else: listens on the memcached port
# and the next one, then for each phase runs the firewall unit's command (through the harness's launcher, so under
# the unit's own capabilities and seccomp filters) and connects to both ports from each source address.
FIREWALL_PROBE = """
import json, socket, subprocess, sys
spec = json.loads(sys.argv[1])
subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
listeners = [socket.create_server(("127.0.0.1", port)) for port in spec["ports"]]
reached = {}
for phase, command in spec["phases"]:
    subprocess.run(command, check=True, cwd=spec["cwd"], timeout=30)
    for source in spec["sources"]:
        for port in spec["ports"]:
            client = socket.socket()
            client.settimeout(0.5)
            client.bind((source, 0))
            try:
                client.connect(("127.0.0.1", port))
                reached[f"{phase} {source}->{port}"] = True
            except OSError:
                reached[f"{phase} {source}->{port}"] = False
            client.close()
print(json.dumps(reached))
"""


def test_memcached_firewall_lets_in_only_the_app_hosts(deployment: Deployment) -> None:
    """The firewall unit run for real in a throwaway network namespace: once started (and after a reload, which
    replaces the table), the memcached port answers the app hosts' addresses and the node itself but not another
    address, and other ports are left alone; once stopped, its table is gone."""
    name = HOSTS[0]
    host = deployment.hosts[name]
    unit = Unit(host.root, "phizer-memcached-firewall.service")
    prefix = host.launcher(unit)
    port = int(deployment.memcached[name].rsplit(":", 1)[1])
    stranger = "127.0.0.99"
    spec = {
        "cwd": str(support.REPO),
        "ports": [port, port + 1],
        "sources": ["127.0.0.1", *CLIENT_ADDRESSES.values(), stranger],
        "phases": [[phase, [*prefix, *unit.commands(key)[0]]] for phase, key in PHASES],
    }
    argv = ["unshare", "--net", "--", sys.executable, "-c", FIREWALL_PROBE, json.dumps(spec)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    expected = {
        f"{phase} {source}->{p}": phase == "stop" or source != stranger or p != port
        for phase, _ in PHASES
        for source in spec["sources"]
        for p in spec["ports"]
    }
    assert json.loads(result.stdout) == expected


def test_memcached_nodes_restart_one_at_a_time() -> None:
    plays = yaml.safe_load((ANSIBLE / "site.yml").read_text())
    (memcached,) = (play for play in plays if play["hosts"] == "memcached")
    assert memcached["serial"] == 1


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


def test_purge_on_a_deployed_host(deployment: Deployment, s3_endpoint: str, corpus: Path) -> None:
    """`phizer purge` run on a host (its venv and code): the instance, user phizer, deletes the rendition nginx's
    workers wrote (they run as phizer too) and the original in the pool; the next request asks S3 again."""
    from service.cache import MemcachedOriginals, origins_namespace
    from service.config import Limits, MemcachedOptions

    _put(s3_endpoint, corpus / PHOTO, "purge/photo.jpg")
    host, url = deployment.hosts[HOSTS[0]], deployment.urls[HOSTS[0]]
    requests.get(url + "/small/purge/photo.jpg", timeout=60)
    assert requests.get(url + "/small/purge/photo.jpg", timeout=60).headers["X-Cache-Status"] == "HIT"
    pool = MemcachedOptions(servers=tuple(deployment.memcached[name] for name in HOSTS))
    cache = MemcachedOriginals(pool, Limits(), origins_namespace([f"s3://{BUCKET}"]))
    deadline = time.monotonic() + 10
    while cache.head("purge/photo.jpg") is None:  # stored in the background
        assert time.monotonic() < deadline, "the original never reached memcached"
        time.sleep(0.1)
    gets = deployment.s3.gets[f"/{BUCKET}/purge/photo.jpg"]
    cli = ["PYTHONPATH=/opt/phizer/app", "/opt/phizer/venv/bin/python", "-m", "service.cli"]
    purged = host.run(*cli, "purge", "purge/photo.jpg", "--host", url)
    assert purged.returncode == 0, purged.stdout + purged.stderr
    assert purged.stdout == f"{url}: purge/photo.jpg: 1 cached renditions removed, original removed from memcached\n"
    again = requests.get(url + "/small/purge/photo.jpg", timeout=60)
    assert (again.status_code, again.headers["X-Cache-Status"]) == (200, "MISS")
    assert deployment.s3.gets[f"/{BUCKET}/purge/photo.jpg"] == gets + 1
