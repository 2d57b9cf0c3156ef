"""The peers phizer is measured against: thumbor (in its own venv) and ipx (libvips, in bench/ipx/) behind nginx,
and nginx serving static files.

thumbor runs as N single-process servers on their own ports behind one nginx with ``least_conn``, the way it is
deployed; N and the cores are the same as phizer's instances. Its config (bench/thumbor.conf.j2) makes it do
the same work per rendition; ``thumbor_path`` maps phizer's presets onto thumbor URLs. ipx runs as one Node
process (sharp spreads each render over libuv's and libvips' threads, so one process uses every core), as
`npx ipx serve --dir FOLDER` does; ``ipx_path`` maps the presets onto its URLs. Both sit behind the peers' nginx
with a proxy_cache, so they pay what phizer pays on a miss (a proxy hop, a cache write).
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
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
IPX_DIR = BENCH_DIR / "ipx"
IPX_CLI = IPX_DIR / "node_modules" / "ipx" / "bin" / "ipx.mjs"
THUMBOR_DEFAULT_QUALITY = 80  # thumbor's own QUALITY default: the peer's "defaults" runs leave quality to it


def thumbor_path(preset: Preset, key: str, fmt: str, equal: bool = True) -> str:
    """thumbor's URL for phizer's ``preset`` of ``key``, encoded as ``fmt`` (the format phizer answers with).

    contain -> ``fit-in/WxH`` (0 = free side; fit-in never enlarges, like phizer without upscale);
    cover -> ``WxH`` (thumbor's centred crop, no smart detection); format as a filter, and with ``equal`` the
    preset's quality too (without it, thumbor's default quality: each side at its defaults).
    """
    size = f"{preset.width or 0}x{preset.height or 0}"
    fit = "fit-in/" if preset.fit == "contain" else ""
    quality = f"quality({preset.quality_for(fmt)}):" if equal else ""
    return f"/unsafe/{fit}{size}/filters:{quality}format({fmt})/{key}"


def ipx_path(preset: Preset, key: str, fmt: str, equal: bool = True) -> str:
    """ipx's URL for phizer's ``preset`` of ``key`` as ``fmt`` (modifiers of bench/ipx/node_modules/ipx/README.md).

    contain -> ``w_W`` / ``h_H`` / ``s_WxH,fit_inside`` (ipx never enlarges unless ``enlarge``); cover -> ``s_WxH``
    (sharp's default fit is a centred cover crop); with ``equal`` the preset's quality (else sharp's default, 80).
    ipx does not apply EXIF orientation (phizer and thumbor do): one corpus image gets less work on its side.
    """
    if preset.fit == "cover" or (preset.width and preset.height):
        mods = [f"s_{preset.width or preset.height}x{preset.height or preset.width}"]
        if preset.fit == "contain":
            mods.append("fit_inside")
    else:
        mods = [f"w_{preset.width}" if preset.width else f"h_{preset.height}"]
    if preset.upscale:
        mods.append("enlarge")
    if equal:
        mods.append(f"q_{preset.quality_for(fmt)}")
    mods.append(f"f_{fmt}")
    return f"/{','.join(mods)}/{key}"


@dataclasses.dataclass(frozen=True)
class Peer:
    """A resizing peer as the scenarios address it: its name, base URL (through the peers' nginx) and URL grammar."""

    name: str
    url: str
    path: Callable[[Preset, str, str, bool], str]  # (preset, key, format, equal settings) -> path


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
    ) -> None:
        if not THUMBOR_PYTHON.exists():
            raise RuntimeError(f"{THUMBOR_VENV} is missing: `make bench` installs thumbor there")
        if not IPX_CLI.exists():
            raise RuntimeError(f"{IPX_CLI} is missing: `make bench` installs ipx there (npm ci in bench/ipx)")
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
            quality=THUMBOR_DEFAULT_QUALITY,
            png_compress_level=encoding.png_compress_level,
        )
        self.thumbor_ports = [free_port() for _ in range(instances)]
        self.thumbor_port, self.static_port, self.static_sendfile_port = free_port(), free_port(), free_port()
        self.ipx_port, self.ipx_proxy_port = free_port(), free_port()
        self.originals = originals
        _render(
            "peer_nginx.conf.j2",
            workdir / "nginx.conf",
            worker_processes=len(cpus),
            state_dir=str(workdir),
            thumbors=[f"127.0.0.1:{port}" for port in self.thumbor_ports],
            thumbor_listen=f"127.0.0.1:{self.thumbor_port}",
            static_listen=f"127.0.0.1:{self.static_port}",
            static_sendfile_listen=f"127.0.0.1:{self.static_sendfile_port}",
            static_root=str(static_root),
            ipx=f"127.0.0.1:{self.ipx_port}",
            ipx_listen=f"127.0.0.1:{self.ipx_proxy_port}",
        )
        self.cpus = cpus
        self.thumbor_url = f"http://127.0.0.1:{self.thumbor_port}"
        self.static_url = f"http://127.0.0.1:{self.static_port}"  # like phizer's nginx: no sendfile
        self.static_sendfile_url = f"http://127.0.0.1:{self.static_sendfile_port}"  # a stock static nginx
        self.ipx_url = f"http://127.0.0.1:{self.ipx_proxy_port}"
        self.thumbor = Peer("thumbor", self.thumbor_url, thumbor_path)
        self.ipx = Peer("ipx", self.ipx_url, ipx_path)

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
            ipx = Process(
                "ipx",
                [shutil.which("node") or "/usr/bin/node", str(IPX_CLI), "serve", "--dir", str(self.originals),
                 "--host", "127.0.0.1", "--port", str(self.ipx_port)],
                self.workdir / "ipx.log",
                cwd=IPX_DIR,
                env={"NODE_ENV": "production"},
            )
            self.procs.append(ipx)
            for proc, port in zip(self.procs[: len(self.thumbor_ports)], self.thumbor_ports, strict=True):
                proc.wait_ready(http_ready(f"http://127.0.0.1:{port}/healthcheck"), timeout=60)
            ipx.wait_ready(tcp_ready("127.0.0.1", self.ipx_port), timeout=60)
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
            proc.wait_ready(tcp_ready("127.0.0.1", self.ipx_proxy_port))
            for proc in self.procs:
                system.pin(proc.pid, self.cpus)
        except BaseException:
            self.close()
            raise
        return self

    def thumbor_pids(self) -> list[int]:
        """The thumbor processes (one per instance), for RSS."""
        return [proc.pid for proc in self.procs if proc.name.startswith("thumbor-")]

    def nginx_pids(self) -> list[int]:
        """The peers' nginx (master + workers): the whole of B1's static side."""
        return [pid for proc in self.procs if proc.name == "peer-nginx" for pid in system.tree(proc.pid)]

    def pids(self, peer: Peer) -> list[int]:
        """Every process of ``peer``'s side: the peers' nginx (master + workers) and the peer's own servers."""
        own = [p for p in self.procs if p.name == "peer-nginx" or p.name.startswith(f"{peer.name}")]
        return [pid for proc in own for pid in system.tree(proc.pid)]

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        self.procs.clear()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

