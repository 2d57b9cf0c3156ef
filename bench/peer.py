"""The peers phizer is measured against: thumbor (in its own venv) behind nginx, and nginx serving static files.

thumbor runs as N single-process servers on their own ports behind one nginx with ``least_conn``, the way it is
deployed; N and the cores are the same as phizer's instances. Its config (bench/thumbor.conf.j2) makes it do
the same work per rendition; ``thumbor_path`` maps phizer's presets onto thumbor URLs.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import TracebackType

import jinja2

from bench import system
from service.config import Encoding
from service.presets import Preset
from service.procs import Process, free_port, http_ready, tcp_ready

BENCH_DIR = Path(__file__).resolve().parent
THUMBOR_VENV = BENCH_DIR / ".venv-thumbor"
THUMBOR_PYTHON = THUMBOR_VENV / "bin" / "python"


def thumbor_path(preset: Preset, key: str, fmt: str) -> str:
    """thumbor's URL for phizer's ``preset`` of ``key``, encoded as ``fmt`` (the format phizer answered with).

    contain -> ``fit-in/WxH`` (0 = free side; fit-in never enlarges, like phizer without upscale);
    cover -> ``WxH`` (thumbor's centred crop, no smart detection); quality and format as filters.
    """
    size = f"{preset.width or 0}x{preset.height or 0}"
    fit = "fit-in/" if preset.fit == "contain" else ""
    filters = f"filters:quality({preset.quality_for(fmt)}):format({fmt})"
    return f"/unsafe/{fit}{size}/{filters}/{key}"


def _render(template: str, target: Path, **values: object) -> None:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(BENCH_DIR), undefined=jinja2.StrictUndefined)
    target.write_text(env.get_template(template).render(**values))


class Peers:
    """N thumbor processes and one nginx (thumbor proxy + static server), pinned to ``cpus``."""

    def __init__(
        self,
        workdir: Path,
        originals: Path,
        static_root: Path,
        instances: int,
        encoding: Encoding,
        cpus: set[int],
        quality: int = 82,
    ) -> None:
        if not THUMBOR_PYTHON.exists():
            raise RuntimeError(f"{THUMBOR_VENV} is missing: `make bench` installs thumbor there")
        self.workdir = workdir
        self.procs: list[Process] = []
        workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / "tmp" / sub).mkdir(parents=True, exist_ok=True)
        storage = workdir / "thumbor-storage"
        shutil.rmtree(storage, ignore_errors=True)
        _render(
            "thumbor.conf.j2",
            workdir / "thumbor.conf",
            originals=str(originals),
            storage=str(storage),
            quality=quality,
            png_compress_level=encoding.png_compress_level,
        )
        self.thumbor_ports = [free_port() for _ in range(instances)]
        self.thumbor_port, self.static_port = free_port(), free_port()
        _render(
            "peer_nginx.conf.j2",
            workdir / "nginx.conf",
            worker_processes=len(cpus),
            state_dir=str(workdir),
            thumbors=[f"127.0.0.1:{port}" for port in self.thumbor_ports],
            thumbor_listen=f"127.0.0.1:{self.thumbor_port}",
            static_listen=f"127.0.0.1:{self.static_port}",
            static_root=str(static_root),
        )
        self.cpus = cpus
        self.thumbor_url = f"http://127.0.0.1:{self.thumbor_port}"
        self.static_url = f"http://127.0.0.1:{self.static_port}"

    def __enter__(self) -> Peers:
        try:
            for i, port in enumerate(self.thumbor_ports):
                proc = Process(
                    f"thumbor-{i}",
                    [str(THUMBOR_VENV / "bin" / "thumbor"), "-c", str(self.workdir / "thumbor.conf"),
                     "-i", "127.0.0.1", "-p", str(port), "-l", "error"],
                    self.workdir / f"thumbor-{i}.log",
                )
                self.procs.append(proc)
            for proc, port in zip(self.procs, self.thumbor_ports, strict=True):
                proc.wait_ready(http_ready(f"http://127.0.0.1:{port}/healthcheck"), timeout=60)
            nginx = shutil.which("nginx") or "/usr/sbin/nginx"
            proc = Process(
                "peer-nginx",
                [nginx, "-p", str(self.workdir), "-c", str(self.workdir / "nginx.conf"),
                 "-e", str(self.workdir / "error.log"), "-g", "daemon off;"],
                self.workdir / "nginx.out",
            )
            self.procs.append(proc)
            proc.wait_ready(tcp_ready("127.0.0.1", self.static_port))
            proc.wait_ready(tcp_ready("127.0.0.1", self.thumbor_port))
            for proc in self.procs:
                system.pin(proc.pid, self.cpus)
        except BaseException:
            self.close()
            raise
        return self

    def thumbor_pids(self) -> list[int]:
        """The thumbor processes (one per instance), for RSS."""
        return [proc.pid for proc in self.procs if proc.name.startswith("thumbor-")]

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

