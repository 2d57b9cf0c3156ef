"""``phizer``: the one command line (installed into the venv by ``make install``; ``python -m service.cli`` too).

phizer run [--port P ...]            the whole stack on this machine (what ``make run`` calls)
phizer purge KEY... [--host URL]     forget keys' renditions (nginx, each host or --inventory's) and originals
phizer warm KEY... | --prefix P      render every preset of keys through nginx ahead of visitors
phizer check-config FILE             validate a config; print the effective presets and limits
phizer sign WxH KEY... [--fit F]     print signed ad-hoc URLs (signing.keys or PHIZER_SIGNING_KEYS)
phizer bench | soak [ARGS]           ``make bench`` / ``make soak`` (their peers and venvs come with them)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import urllib.parse
from collections.abc import Sequence
from typing import TYPE_CHECKING

import urllib3

if TYPE_CHECKING:
    from service.config import Config

DEFAULT_URL = f"http://127.0.0.1:{os.environ.get('PHIZER_PORT', '8080')}"  # the local stack (phizer run)
PURGE_BATCH = 100  # keys per request (the instance accepts up to service.purge.MAX_KEYS)


def _http(concurrency: int = 1) -> urllib3.PoolManager:
    return urllib3.PoolManager(maxsize=concurrency, retries=False, timeout=urllib3.Timeout(connect=5, read=120))


def _base(url: str) -> str:
    return url.rstrip("/")


def inventory_hosts(inventory: str, group: str) -> list[str]:
    """The nginx URL of each host of ``group`` in an Ansible inventory (any form Ansible reads, with its
    group_vars/host_vars: ``ansible-inventory --list``): ``http://<ansible_host or name>:<nginx_listen's port>``,
    port 80 when the inventory does not set ``nginx_listen`` (the nginx role's default, 0.0.0.0:80)."""
    tool = shutil.which("ansible-inventory", path=os.pathsep.join([os.path.dirname(sys.executable), os.defpath]))
    if tool is None:
        raise RuntimeError("ansible-inventory not found (it comes with Ansible: make install)")
    run = subprocess.run([tool, "-i", inventory, "--list"], capture_output=True, text=True, check=False)
    if run.returncode != 0:
        raise RuntimeError(f"ansible-inventory -i {inventory}: {run.stderr.strip().splitlines()[-1:]}")
    listing = json.loads(run.stdout)
    hostvars = listing.get("_meta", {}).get("hostvars", {})

    def members(name: str) -> list[str]:
        entry = listing.get(name, {})
        return [*entry.get("hosts", []), *(host for child in entry.get("children", []) for host in members(child))]

    hosts = list(dict.fromkeys(members(group)))
    if not hosts:
        raise RuntimeError(f"{inventory}: no host in group {group!r}")
    urls = []
    for host in hosts:
        variables = hostvars.get(host, {})
        port = str(variables.get("nginx_listen", "0.0.0.0:80")).rpartition(":")[2]
        address = str(variables.get("ansible_host", host))
        urls.append(f"http://{f'[{address}]' if ':' in address else address}:{port}")
    return urls


def cmd_purge(args: argparse.Namespace) -> int:
    from service.purge import PURGE_PATH

    hosts = list(args.host or [])
    if args.inventory:
        try:
            hosts += inventory_hosts(args.inventory, args.group)
        except (RuntimeError, ValueError) as exc:
            print(f"phizer purge: {exc}", file=sys.stderr)
            return 1
    http, failed = _http(), False
    for host in [_base(url) for url in hosts or [DEFAULT_URL]]:
        for start in range(0, len(args.keys), PURGE_BATCH):
            batch = args.keys[start : start + PURGE_BATCH]
            try:
                resp = http.request(
                    "POST",
                    host + PURGE_PATH,
                    body=json.dumps({"keys": batch}).encode(),
                    headers={"Content-Type": "application/json"},
                )
            except urllib3.exceptions.HTTPError as exc:
                print(f"{host}: {exc}", file=sys.stderr)
                failed = True
                break
            if resp.status != 200:
                print(f"{host}: {resp.status} {resp.data.decode(errors='replace').strip()}", file=sys.stderr)
                failed = True
                break
            for key, outcome in json.loads(resp.data)["purged"].items():
                original = "original removed from memcached" if outcome["original"] else "original not in memcached"
                print(f"{host}: {key}: {outcome['renditions']} cached renditions removed, {original}")
    return 1 if failed else 0


def cmd_warm(args: argparse.Namespace) -> int:
    from service.config import ConfigError, load_config
    from service.origins import list_keys
    from service.warm import served_presets, summary, warm, warm_list

    if bool(args.keys) == (args.prefix is not None):
        print("phizer warm: give either keys or --prefix", file=sys.stderr)
        return 2
    url = _base(args.url)
    http = _http(args.concurrency)
    try:
        config = load_config(args.config)
        keys = list(args.keys or list_keys(config, args.prefix))
        presets = served_presets(http, url)
    except (ConfigError, ValueError, RuntimeError, urllib3.exceptions.HTTPError) as exc:
        print(f"phizer warm: {exc}", file=sys.stderr)
        return 1
    todo, skipped = warm_list(presets, keys, config.limits.max_key_bytes)
    if skipped:
        print(f"skipped {skipped} invalid keys", file=sys.stderr)
    result = warm(http, url, todo, args.concurrency, args.retries, progress=not args.no_progress)
    print(summary(result, len(keys) - skipped, len(todo), url))
    return 1 if result.errors else 0


def _config(path: str | None, command: str) -> Config | None:
    """The validated config (``path``, else $PHIZER_CONFIG, else the default), or None once the reason is printed."""
    from service.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"{command}: invalid config: {exc}", file=sys.stderr)
        return None


def cmd_check_config(args: argparse.Namespace) -> int:
    from service.identity import preset_fingerprints
    from service.presets import order_label

    config = _config(args.file, "phizer")
    if config is None:
        return 1
    overridable = ("PHIZER_ORIGINS", "PHIZER_MEMCACHED", "PHIZER_ALLOW_PRIVATE_ORIGINS")
    overrides = [name for name in overridable if os.environ.get(name)]
    print(f"{args.file}: valid" + (f" (with {', '.join(overrides)} from the environment)" if overrides else ""))
    fingerprints = preset_fingerprints(config)
    print("presets:")
    for name, preset in config.presets.items():
        size = f"{preset.width or '-'}x{preset.height or '-'}"
        extra = f" quality_by_format={dict(preset.quality_by_format)}" if preset.quality_by_format else ""
        fmt = f"auto[{order_label(preset)}]" if preset.format == "auto" else preset.format  # with its order
        print(
            f"  {name:<12} {size:<11} fit={preset.fit:<7} upscale={str(preset.upscale).lower():<5} "
            f"quality={preset.quality:<3} format={fmt:<15} fingerprint={fingerprints[name]}{extra} "
            f"cache_valid={preset.cache_valid}s cache_control={preset.cache_control!r}"
        )
    print("origins:", ", ".join(config.origins))
    memcached = dataclasses.asdict(config.memcached)
    memcached["servers"] = ", ".join(config.memcached.servers) or "(none: no originals cache)"
    for section, values in (
        ("limits", dataclasses.asdict(config.limits)),
        ("encoding", dataclasses.asdict(config.encoding)),
        ("memcached", memcached),
    ):
        print(f"{section}:")
        for name, value in values.items():
            print(f"  {name} = {value}")
    others = {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if f.name not in ("presets", "origins", "memcached", "limits", "encoding")
    }
    print("other:")
    for name, value in others.items():
        print(f"  {name} = {value}")
    keys = len(config.signing.keys)  # how many, never what they are
    print(f"signed ad-hoc sizes: {f'on ({keys} keys)' if keys else 'off (no signing keys)'}")
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    """Print a signed ad-hoc URL per key, checked by the app's own parser (a size over the limits is refused here)."""
    from service.errors import PhizerError
    from service.presets import ADHOC, parse_adhoc
    from service.signature import sign

    config = _config(args.config, "phizer sign")
    if config is None:
        return 1
    if not config.signing.keys:
        print("phizer sign: signing is off: set signing.keys or PHIZER_SIGNING_KEYS", file=sys.stderr)
        return 1
    if args.gravity and not args.fit:
        print("phizer sign: --gravity needs --fit (the URL gives the fit before the gravity)", file=sys.stderr)
        return 2
    options = [part for part in (args.size, args.fit, args.gravity) if part]
    for key in args.keys:
        signed = "/".join([*options, key])
        signature = sign(config.signing.keys, signed)
        try:
            request = parse_adhoc(f"{signature}/{signed}", config.signing, config.limits.max_key_bytes)
        except PhizerError as exc:
            print(f"phizer sign: {key}: {exc.reason}", file=sys.stderr)
            return 1
        if request.key != key:  # e.g. a key starting with "cover/" and no --fit: the URL would mean another key
            print(f"phizer sign: {key}: give --fit (and --gravity): its first segment reads as one", file=sys.stderr)
            return 1
        print(f"{_base(args.base)}/{ADHOC}/{signature}/{urllib.parse.quote(signed)}")
    return 0


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="phizer", description="phizer, an on-the-fly image resizer: operations.")
    sub = top.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser(
        "run",
        help="start nginx, memcached and the instances on this machine (`phizer run --help`)",
        add_help=False,
    )

    purge = sub.add_parser(
        "purge",
        help="remove keys' cached renditions (nginx, on each host) and originals (memcached)",
        description="Remove every cached rendition of each KEY from nginx's cache on each host (every preset, "
        "format token and format suffix, and signed ad-hoc sizes), and the original from the shared memcached "
        "pool: the next request re-fetches it from the origin. Each host's admin API answers loopback only (and "
        "nginx's admin_allow): run this on each host, or allow the address it runs from.",
    )
    purge.add_argument("keys", nargs="+", metavar="KEY", help="an original's key, as in /<preset>/<key>")
    purge.add_argument(
        "--host",
        action="append",
        metavar="URL",
        help=f"a host's nginx (repeat for each host; default {DEFAULT_URL} unless --inventory is given)",
    )
    purge.add_argument(
        "--inventory",
        metavar="INVENTORY",
        help="an Ansible inventory (file or folder): purge on each host of --group, at http://<ansible_host>:<port "
        "of nginx_listen, else 80>; those hosts' nginx_admin_allow must let this machine in",
    )
    purge.add_argument("--group", default="nginx", help="the inventory's group to purge on (default nginx)")
    purge.set_defaults(func=cmd_purge)

    warm = sub.add_parser(
        "warm",
        help="render every preset of keys through nginx, so first visitors get cache hits",
        description="Request every preset (and each format token: AVIF, WebP and neither, as each 'auto' preset's "
        "negotiation order allows) of the "
        "given keys, or of every key under --prefix in the config's first origin (s3:// or file://), through "
        "nginx, so each rendition is in its cache. A 503 is retried after its Retry-After.",
    )
    warm.add_argument("keys", nargs="*", metavar="KEY", help="an original's key")
    warm.add_argument("--prefix", help="warm every key under this prefix of the first origin ('' for all)")
    warm.add_argument("--url", default=DEFAULT_URL, help=f"nginx to warm through (default {DEFAULT_URL})")
    warm.add_argument("--config", help="config whose first origin --prefix lists (default $PHIZER_CONFIG or bundled)")
    warm.add_argument("--concurrency", type=int, default=8, help="requests at once (default 8)")
    warm.add_argument("--retries", type=int, default=3, help="retries of a 503, after its Retry-After (default 3)")
    warm.add_argument("--no-progress", action="store_true", help="no progress bar")
    warm.set_defaults(func=cmd_warm)

    check = sub.add_parser(
        "check-config",
        help="validate a config file; print the effective presets and limits",
        description="Validate FILE as phizer does at start-up (with the PHIZER_* environment overrides) and "
        "print the effective presets, origins and limits; exit 1 with the bad key named on error.",
    )
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=cmd_check_config)

    signer = sub.add_parser(
        "sign",
        help="print signed URLs of an ad-hoc size (signing.keys, or PHIZER_SIGNING_KEYS)",
        description="Print /_/<signature>/<W>x<H>[/<fit>[/<gravity>]]/<key> for each KEY, signed with the first "
        "key of the config's signing.keys (or $PHIZER_SIGNING_KEYS). W or H may be left out (640x, x480).",
    )
    signer.add_argument("size", metavar="WxH", help="the box, e.g. 640x480, 640x or x480")
    signer.add_argument("keys", nargs="+", metavar="KEY", help="an original's key")
    signer.add_argument("--fit", help="contain (default) or cover, as a preset's")
    signer.add_argument("--gravity", help="where a cover crop keeps the image: centre, north, ..., smart")
    signer.add_argument("--base", default=DEFAULT_URL, help=f"the site's URL ('' for paths; default {DEFAULT_URL})")
    signer.add_argument("--config", help="config file (default: $PHIZER_CONFIG, else the bundled default)")
    signer.set_defaults(func=cmd_sign)

    for target, what in (("bench", "phizer against thumbor and nginx on this machine"), ("soak", "ten minutes of "
                         "mixed traffic through the real stack; ARGS e.g. --minutes 1")):  # fmt: skip
        shortcut = sub.add_parser(target, help=f"`make {target}`: {what}")
        shortcut.add_argument("args", nargs=argparse.REMAINDER, help="passed on (SOAK_ARGS for soak)")
        shortcut.set_defaults(func=cmd_make)
    return top


def cmd_make(args: argparse.Namespace) -> int:
    """Run the Makefile's target: it installs what the bench needs (thumbor's venv) before running it."""
    from service.config import REPO_ROOT

    extra = [f"SOAK_ARGS={' '.join(args.args)}"] if args.command == "soak" and args.args else []
    os.execvp("make", ["make", "-C", str(REPO_ROOT), args.command, *extra])
    return 1  # not reached: execvp replaces this process


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run"]:  # the launcher parses its own options (and --help)
        from service.launcher import main as run

        return run(argv[1:], prog="phizer run")
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="phizer: %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
