"""Fresh Debian hosts for the deploy test: debootstrap roots reached by Ansible's chroot connection.

There is no Docker and no systemd as PID 1 here, so a "host" is a bookworm root folder: Ansible converges it
through ``community.general.chroot``, and the services it installed are started the way their systemd units
say (user, groups, environment, working and runtime folders, ExecStartPre/ExecStart), read from the unit
files the deployment wrote. The network is the machine's own, so hosts differ by port, not address.

Slow, network-bound steps are cached between runs under ``$PHIZER_CACHE_DIR`` (default ``~/.cache/phizer``):
the debootstrapped root as a tarball (built on the first run), and the apt and pip downloads the hosts made.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from service.procs import Process

CACHE = Path(os.environ.get("PHIZER_CACHE_DIR", Path.home() / ".cache" / "phizer"))
SUITE = "bookworm"
# A real Debian host has systemd (systemd-analyze checks the units with it) and python3 (Ansible needs it).
BASE_PACKAGES = ("python3", "systemd")
ROOTFS = CACHE / f"{SUITE}-minbase-{'-'.join(BASE_PACKAGES)}.tar"
# Downloads worth keeping between runs: path inside a root -> folder under CACHE.
DOWNLOAD_CACHES = {"var/cache/apt/archives": "apt", "root/.cache/pip": "pip"}
LOCAL_CAS = Path("/usr/local/share/ca-certificates")  # this machine's extra CAs (TLS to the registries)
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # what systemd gives services


def _run(argv: list[str], timeout: float) -> None:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode:
        raise RuntimeError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr[-2000:]}")


def rootfs_tarball() -> Path:
    """The cached minbase root, built with debootstrap on the first run (about 90 s, 280 MB)."""
    if ROOTFS.exists():
        return ROOTFS
    CACHE.mkdir(parents=True, exist_ok=True)
    build = CACHE / "rootfs-build"
    shutil.rmtree(build, ignore_errors=True)
    try:
        _run(["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", SUITE, str(build)], 900)
        shutil.rmtree(build / "var/cache/apt/archives", ignore_errors=True)
        (build / "var/cache/apt/archives/partial").mkdir(parents=True)
        partial = ROOTFS.with_suffix(".part")
        _run(["tar", "-C", str(build), "-cf", str(partial), "."], 300)
        partial.rename(ROOTFS)  # atomic: an interrupted build leaves no half tarball behind
    finally:
        _assert_nothing_mounted_under(build)
        shutil.rmtree(build, ignore_errors=True)
    return ROOTFS


def _mounts_under(folder: Path) -> list[str]:
    prefix = str(folder.resolve()) + "/"
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1].replace("\\040", " ") for line in mounts]
    return [p for p in points if (p + "/").startswith(prefix)]


def _assert_nothing_mounted_under(folder: Path) -> None:
    if folder.exists() and _mounts_under(folder):
        raise RuntimeError(f"still mounted under {folder}: {_mounts_under(folder)}; not deleting it")


def _ids(root: Path, user: str | None, group: str | None) -> tuple[int, int, list[int]]:
    """uid, gid and supplementary gids from the root's own account files (its users do not exist here)."""
    passwd = {f[0]: f for f in (line.split(":") for line in (root / "etc/passwd").read_text().splitlines())}
    groups = [line.split(":") for line in (root / "etc/group").read_text().splitlines()]
    uid, gid = (int(passwd[user][2]), int(passwd[user][3])) if user else (0, 0)
    if group:
        gid = next(int(g[2]) for g in groups if g[0] == group)
    extra = [int(g[2]) for g in groups if user and user in g[3].split(",")]
    return uid, gid, sorted({gid, *extra})


class Unit:
    """The [Service] settings of one installed unit file, with ``%i`` (and ``%%``) expanded."""

    def __init__(self, root: Path, name: str, instance: str = "") -> None:
        self.name = name.replace("@", f"@{instance}") if instance else name
        self.settings: dict[str, list[str]] = {}
        section = ""
        text = (root / "etc/systemd/system" / name).read_text().replace("\\\n", " ")
        for line in text.splitlines():
            line = line.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("["):
                section = line
            elif section == "[Service]":
                key, _, value = line.partition("=")
                self.settings.setdefault(key.strip(), []).append(self._expand(value.strip(), instance))

    @staticmethod
    def _expand(value: str, instance: str) -> str:
        def specifier(match: re.Match[str]) -> str:
            if match.group(1) not in "i%":
                raise ValueError(f"unit specifier %{match.group(1)} is not supported by this test harness")
            return instance if match.group(1) == "i" else "%"

        return re.sub(r"%(.)", specifier, value)

    def one(self, key: str, default: str = "") -> str:
        return self.settings.get(key, [default])[-1]

    def commands(self, key: str) -> list[list[str]]:
        argvs = [shlex.split(line) for line in self.settings.get(key, [])]
        for argv in argvs:
            if argv[0][0] in "-@+!:":
                raise ValueError(f"{self.name}: {key} prefix {argv[0][0]!r} is not supported by this test harness")
        return argvs


class ChrootHost:
    """One debootstrapped root: created fresh, converged by Ansible, its services started, torn down."""

    def __init__(self, root: Path, logs: Path) -> None:
        self.root = root
        self.logs = logs
        self.processes: list[Process] = []
        self.mounted: list[Path] = []

    def create(self) -> None:
        """Unpack the cached root, keep apt from starting services, trust this machine's CAs, mount /proc."""
        self.root.mkdir(parents=True)
        _run(["tar", "-C", str(self.root), "-xf", str(rootfs_tarball())], 300)
        policy = self.root / "usr/sbin/policy-rc.d"  # else installing nginx starts it on the machine's port 80
        policy.write_text("#!/bin/sh\nexit 101\n")
        policy.chmod(0o755)
        cas = self.root / LOCAL_CAS.relative_to("/")
        cas.mkdir(parents=True, exist_ok=True)
        for cert in LOCAL_CAS.glob("*.crt"):  # installed by ca-certificates' postinst when the role adds it
            shutil.copy2(cert, cas / cert.name)
        for inside, name in DOWNLOAD_CACHES.items():
            if (CACHE / name).is_dir():
                shutil.copytree(CACHE / name, self.root / inside, dirs_exist_ok=True)
        proc = self.root / "proc"
        _run(["mount", "-t", "proc", "proc", str(proc)], 30)
        self.mounted.append(proc)

    def keep_downloads(self) -> None:
        """Copy what apt and pip downloaded back into the cache, for the next run."""
        for inside, name in DOWNLOAD_CACHES.items():
            source = self.root / inside
            if source.is_dir():
                shutil.copytree(source, CACHE / name, dirs_exist_ok=True, ignore=shutil.ignore_patterns("lock"))

    def run(self, *argv: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a command inside the root as root (no environment from this machine but PATH)."""
        return subprocess.run(
            ["chroot", str(self.root), "/usr/bin/env", "-i", f"PATH={DEFAULT_PATH}", *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start_unit(self, name: str, instance: str = "") -> Process:
        """Start an installed unit the way systemd would, minus the sandboxing: returns the main process."""
        unit = Unit(self.root, name, instance)
        uid, gid, gids = _ids(self.root, unit.settings.get("User", [None])[-1], unit.settings.get("Group", [None])[-1])
        for runtime in unit.one("RuntimeDirectory").split():
            folder = self.root / "run" / runtime
            folder.mkdir(parents=True, exist_ok=True)
            os.chown(folder, uid, gid)
            folder.chmod(int(unit.one("RuntimeDirectoryMode", "0755"), 8))
        env = {"PATH": DEFAULT_PATH}
        for path in unit.settings.get("EnvironmentFile", []):
            env.update(_read_env_file(self.root / path.lstrip("-/"), optional=path.startswith("-")))
        for line in unit.settings.get("Environment", []):
            env.update(assignment.split("=", 1) for assignment in shlex.split(line))
        prefix = ["chroot", f"--userspec={uid}:{gid}", f"--groups={','.join(map(str, gids))}", str(self.root)]
        prefix += ["/usr/bin/env", "-i", f"--chdir={unit.one('WorkingDirectory', '/')}"]
        prefix += [f"{key}={value}" for key, value in env.items()]
        for argv in unit.commands("ExecStartPre"):
            result = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=60, check=False)
            if result.returncode:
                raise RuntimeError(f"{unit.name}: ExecStartPre {argv} exited {result.returncode}: {result.stderr}")
        (argv,) = unit.commands("ExecStart")
        process = Process(unit.name, [*prefix, *argv], self.logs / f"{self.root.name}-{unit.name}.log")
        self.processes.append(process)
        return process

    def close(self) -> None:
        """Stop what was started (by pid), unmount what was mounted, delete the root if nothing is left."""
        try:
            for process in reversed(self.processes):
                process.stop()
        finally:
            for point in reversed(self.mounted):
                if subprocess.run(["umount", str(point)], capture_output=True, check=False).returncode:
                    subprocess.run(["umount", "--lazy", str(point)], capture_output=True, check=False)
            _assert_nothing_mounted_under(self.root)
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.root)], check=False, timeout=300)


def _read_env_file(path: Path, optional: bool) -> Mapping[str, str]:
    """systemd's EnvironmentFile: KEY=VALUE lines, values optionally quoted; # and ; start comments."""
    if optional and not path.exists():
        return {}
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and line[0] not in "#;":
            key, _, value = line.partition("=")
            env[key.strip()] = shlex.split(value)[0] if value.strip() else ""
    return env
