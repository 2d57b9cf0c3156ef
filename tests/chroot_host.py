"""Fresh Debian hosts for the deploy test: debootstrap roots reached by Ansible's chroot connection.

There is no Docker and no systemd as PID 1 here, so a "host" is a bookworm root folder: Ansible converges it
through ``community.general.chroot``, and the services it installed are started the way their systemd units
say (user, groups, environment, working and runtime folders, ExecStartPre/ExecStart), read from the unit
files the deployment wrote. The network is the machine's own, so hosts differ by port, not address.

Of the units' sandboxing, what the kernel enforces per process is applied as systemd would apply it (see
``Confinement``): NoNewPrivileges, CapabilityBoundingSet, and the seccomp filters of SystemCallFilter,
SystemCallArchitectures, RestrictAddressFamilies and MemoryDenyWriteExecute (systemd 252's rules). So the
deploy test's requests run under the units' own system call and memory rules: a library that needs writable
executable memory, or a system call outside the unit's allow-list, fails the test instead of production. The
namespace-based settings (ProtectSystem, PrivateTmp, ...) and MemoryMax are not emulated.

Slow, network-bound steps are cached between runs under ``$PHIZER_CACHE_DIR`` (default ``~/.cache/phizer``):
the debootstrapped root as a tarball (built on the first run), and the apt and pip downloads the hosts made.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import json
import mmap
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn

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
REPO = Path(__file__).resolve().parent.parent


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


# Numbers (linux/capability.h) of the capabilities the units keep in CapabilityBoundingSet; add any new one here.
CAPABILITIES = {
    "CAP_CHOWN": 0,
    "CAP_DAC_OVERRIDE": 1,
    "CAP_SETGID": 6,
    "CAP_SETUID": 7,
    "CAP_NET_BIND_SERVICE": 10,
    "CAP_NET_ADMIN": 12,
}
# libseccomp's actions and comparisons (seccomp.h).
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_CMP_EQ, SCMP_CMP_GE, SCMP_CMP_MASKED_EQ = 4, 5, 7
AF_MAX = 46  # address families the kernel knows (linux/socket.h)
SHM_EXEC = 0o100000
PR_SET_NO_NEW_PRIVS, PR_CAPBSET_DROP = 38, 24


def _errno_action(number: int) -> int:
    return 0x00050000 | number


# One seccomp filter: its default action and its rules, each [action, system call, [[arg, op, datum_a, datum_b]...]].
Filter = dict[str, Any]


@dataclasses.dataclass
class Confinement:
    """What systemd enforces per process for a unit, from its settings, as the launcher below applies it.

    Only allow-lists are supported (what phizer's units use); anything else raises, rather than being tested
    less strictly than systemd would run it.
    """

    no_new_privileges: bool = False
    capabilities: list[int] | None = None  # the bounding set to keep; None: unchanged
    filters: list[Filter] = dataclasses.field(default_factory=list)

    @classmethod
    def of(cls, unit: Unit, syscall_groups: Mapping[str, Sequence[str]]) -> Confinement:
        def enabled(key: str) -> bool:
            return unit.one(key, "no").lower() in ("yes", "true", "on", "1")

        def unsupported(key: str, value: str) -> NoReturn:
            raise ValueError(f"{unit.name}: {key}={value} is not supported by this test harness")

        confinement = cls(no_new_privileges=enabled("NoNewPrivileges"))
        if "CapabilityBoundingSet" in unit.settings:
            keep: set[int] = set()
            for line in unit.settings["CapabilityBoundingSet"]:
                if line.startswith("~"):
                    unsupported("CapabilityBoundingSet", line)
                keep = keep | {CAPABILITIES[name] for name in line.split()} if line else set()
            confinement.capabilities = sorted(keep)
        if unit.one("SystemCallArchitectures", "native") != "native":
            unsupported("SystemCallArchitectures", unit.one("SystemCallArchitectures"))  # libseccomp: native only
        if "RestrictAddressFamilies" in unit.settings:
            line = unit.one("RestrictAddressFamilies")
            if line.startswith("~"):
                unsupported("RestrictAddressFamilies", line)
            families = {getattr(socket, name) for name in line.split() if name != "none"}
            refuse = _errno_action(errno.EAFNOSUPPORT)
            rules = [[refuse, "socket", [[0, SCMP_CMP_EQ, af, 0]]] for af in range(AF_MAX) if af not in families]
            rules.append([refuse, "socket", [[0, SCMP_CMP_GE, AF_MAX, 0]]])
            confinement.filters.append({"default": SCMP_ACT_ALLOW, "rules": rules})
        if enabled("MemoryDenyWriteExecute"):
            # systemd 252's rules (seccomp_memory_deny_write_execute): no mapping both writable and executable, no
            # mprotect() to executable, no executable SysV shared memory; each refused with EPERM.
            refuse, wx, x = _errno_action(errno.EPERM), mmap.PROT_WRITE | mmap.PROT_EXEC, mmap.PROT_EXEC
            rules = [
                [refuse, "mmap", [[2, SCMP_CMP_MASKED_EQ, wx, wx]]],
                [refuse, "mprotect", [[2, SCMP_CMP_MASKED_EQ, x, x]]],
                [refuse, "pkey_mprotect", [[2, SCMP_CMP_MASKED_EQ, x, x]]],
                [refuse, "shmat", [[2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC]]],
            ]
            confinement.filters.append({"default": SCMP_ACT_ALLOW, "rules": rules})
        if "SystemCallFilter" in unit.settings:
            allowed: set[str] = set()

            def expand(item: str) -> None:
                if item.startswith("@"):
                    for member in syscall_groups[item]:
                        expand(member)
                else:
                    allowed.add(item)

            expand("@default")  # systemd adds it to every allow-list
            for line in unit.settings["SystemCallFilter"]:
                if line.startswith("~") or ":" in line:
                    unsupported("SystemCallFilter", line)
                for item in line.split():
                    expand(item)
            rules = [[SCMP_ACT_ALLOW, name, []] for name in sorted(allowed)]
            # Loaded last, as systemd does: loading another filter after it would need seccomp(), not allowed.
            confinement.filters.append({"default": SCMP_ACT_KILL_PROCESS, "rules": rules})
        return confinement


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

    def syscall_groups(self) -> dict[str, list[str]]:
        """systemd's system call groups (@system-service...) as this root's systemd defines them, not expanded."""
        if not hasattr(self, "_syscall_groups"):
            result = self.run("systemd-analyze", "syscall-filter", "--no-pager")
            groups: dict[str, list[str]] = {}
            current: list[str] = []
            for line in result.stdout.splitlines():
                if line.startswith("@"):
                    current = groups.setdefault(line.strip(), [])
                elif line.startswith("    ") and not line.strip().startswith("#"):
                    current.append(line.strip())
            if "@system-service" not in groups:
                raise RuntimeError(f"systemd-analyze syscall-filter: {result.stdout[-500:]}{result.stderr[-500:]}")
            self._syscall_groups = groups
        return self._syscall_groups

    def launcher(self, unit: Unit) -> list[str]:
        """The command prefix that runs one of ``unit``'s commands as systemd would, with its identity, environment
        and folders and its seccomp and capability settings (``Confinement``), but without its namespaces. Run it
        from the checkout (``cwd=REPO``)."""
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
        launch = {
            "root": str(self.root),
            "cwd": unit.one("WorkingDirectory", "/"),
            "ids": [uid, gid, gids],
            "env": env,
            **dataclasses.asdict(Confinement.of(unit, self.syscall_groups())),
        }
        # This file run as a program: enters the root, drops to the unit's user, confines itself, execs the command.
        return [sys.executable, "-m", "tests.chroot_host", json.dumps(launch)]

    def start_unit(self, name: str, instance: str = "") -> Process:
        """Start an installed unit the way systemd would (see ``launcher``): returns the main process."""
        unit = Unit(self.root, name, instance)
        prefix = self.launcher(unit)
        for argv in unit.commands("ExecStartPre"):
            result = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=60, check=False, cwd=REPO)
            if result.returncode:
                raise RuntimeError(f"{unit.name}: ExecStartPre {argv} exited {result.returncode}: {result.stderr}")
        (argv,) = unit.commands("ExecStart")
        process = Process(unit.name, [*prefix, *argv], self.logs / f"{self.root.name}-{unit.name}.log", cwd=REPO)
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


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


def _load_seccomp(lib: ctypes.CDLL, spec: Filter) -> None:
    """Build and load one filter for the native architecture (others are killed, as SystemCallArchitectures=native)."""
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_load.argtypes = lib.seccomp_release.argtypes = [ctypes.c_void_p]
    ctx = lib.seccomp_init(spec["default"])
    if not ctx:
        raise OSError("seccomp_init failed")
    try:
        for action, name, comparisons in spec["rules"]:
            number = lib.seccomp_syscall_resolve_name(name.encode())
            if number < 0:
                continue  # no such system call on this architecture
            array = (_ArgCmp * max(len(comparisons), 1))(*(_ArgCmp(*c) for c in comparisons))
            rc = lib.seccomp_rule_add_array(ctx, action, number, len(comparisons), array)
            if rc:
                raise OSError(-rc, f"seccomp_rule_add({name}): {os.strerror(-rc)}")
        rc = lib.seccomp_load(ctx)
        if rc:
            raise OSError(-rc, f"seccomp_load: {os.strerror(-rc)}")
    finally:
        lib.seccomp_release(ctx)


def _launch(launch: dict[str, Any], argv: list[str]) -> NoReturn:
    """Enter the root, drop to the unit's identity, confine this process as systemd would, exec the command."""
    libc = ctypes.CDLL(None, use_errno=True)
    seccomp = ctypes.CDLL("libseccomp.so.2") if launch["filters"] else None  # this machine's, before chroot
    last_cap = int(Path("/proc/sys/kernel/cap_last_cap").read_text())
    os.chroot(launch["root"])
    os.chdir(launch["cwd"])
    if launch["capabilities"] is not None:
        for cap in range(last_cap + 1):
            if cap not in launch["capabilities"] and libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0):
                raise OSError(ctypes.get_errno(), f"PR_CAPBSET_DROP {cap}")
    uid, gid, gids = launch["ids"]
    os.setgroups(gids)
    os.setgid(gid)
    os.setuid(uid)
    if launch["no_new_privileges"] and libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0):
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")
    for spec in launch["filters"]:
        assert seccomp is not None
        _load_seccomp(seccomp, spec)
    os.execvpe(argv[0], argv, launch["env"])


if __name__ == "__main__":
    _launch(json.loads(sys.argv[1]), sys.argv[2:])
