"""``phizer warm``: render every preset of some originals through nginx ahead of their first visitors.

Each key gets one request per preset and format token (an Accept header that earns the token: AVIF, WebP and
neither, as the preset's negotiation order allows, for "auto" presets), the same list service/purge.py derives
from service/presets.py's rules, for the presets the target itself serves (its ``/presets.json``). Keys are given,
or listed from the first origin under a prefix (service.origins.list_keys). Requests go through nginx, so each
rendition lands in its cache: the first visitor gets a HIT. A 503 (the host's render budget is full) is retried
after its Retry-After.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterable, Sequence

import urllib3
from tqdm import tqdm

from service.errors import PhizerError
from service.presets import ADHOC, Preset
from service.purge import Rendition, renditions

MAX_RETRY_AFTER = 30.0  # seconds: a longer Retry-After is capped


def served_presets(http: urllib3.PoolManager, url: str) -> dict[str, Preset]:
    """The presets the target serves, from its ``/presets.json`` (not its signed ad-hoc sizes, entry ``_``)."""
    resp = http.request("GET", url + "/presets.json")
    if resp.status != 200:
        raise RuntimeError(f"{url}/presets.json answered {resp.status}")
    fields = {field.name for field in dataclasses.fields(Preset)}
    presets = {}
    for name, definition in json.loads(resp.data).items():
        if name == ADHOC:
            continue
        known = {k: v for k, v in definition.items() if k in fields and k != "name"}
        if "negotiate" in known:  # a JSON list; the order is what decides the tokens to warm
            known["negotiate"] = tuple(known["negotiate"])
        presets[name] = Preset(name=name, **known)
    return presets


def warm_list(presets: dict[str, Preset], keys: Iterable[str], max_key_bytes: int) -> tuple[list[Rendition], int]:
    """Every request to make for ``keys`` (key by key, so an original is fetched and decoded once), and how many
    keys were skipped as invalid."""
    found: list[Rendition] = []
    skipped = 0
    for key in keys:
        try:
            found += renditions(presets, key, max_key_bytes, format_suffix=False)
        except PhizerError:
            skipped += 1
    return found, skipped


@dataclasses.dataclass
class WarmResult:
    done: int = 0
    cache: Counter[str] = dataclasses.field(default_factory=Counter)  # X-Cache-Status of the successes
    errors: Counter[str] = dataclasses.field(default_factory=Counter)  # status (or "connection") -> count
    retries: int = 0  # 503s retried
    elapsed: float = 0.0


def warm(
    http: urllib3.PoolManager,
    url: str,
    todo: Sequence[Rendition],
    concurrency: int = 8,
    retries: int = 3,
    progress: bool = True,
) -> WarmResult:
    """Request every rendition of ``todo`` from ``url`` with ``concurrency`` requests at once."""
    result = WarmResult()
    lock = threading.Lock()
    pending = iter(todo)
    started = time.monotonic()
    # done/total, rate and ETA are tqdm's own; the errors so far are its postfix (shown from the start, at 0).
    with tqdm(total=len(todo), unit="img", disable=not progress, dynamic_ncols=True, postfix={"errors": 0}) as bar:

        def worker() -> None:
            while True:
                with lock:
                    rendition = next(pending, None)
                if rendition is None:
                    return
                outcome, cache, retried = _get(http, url, rendition, retries)
                with lock:
                    result.retries += retried
                    if outcome == "200":
                        result.done += 1
                        result.cache[cache] += 1
                    else:
                        result.errors[outcome] += 1
                        bar.set_postfix(errors=sum(result.errors.values()), refresh=False)
                    bar.update(1)

        threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, concurrency))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    result.elapsed = time.monotonic() - started
    return result


def _get(http: urllib3.PoolManager, url: str, rendition: Rendition, retries: int) -> tuple[str, str, int]:
    """One rendition: (status or "connection", X-Cache-Status, 503s retried). The body is read and dropped."""
    headers = {"Accept": rendition.accept} if rendition.accept else {}
    target = url + urllib.parse.quote(rendition.path)
    attempt = 0
    while True:
        try:
            resp = http.request("GET", target, headers=headers)
        except urllib3.exceptions.HTTPError:
            return "connection", "", attempt
        if resp.status != 503 or attempt >= retries:
            return str(resp.status), resp.headers.get("X-Cache-Status", "-"), attempt
        attempt += 1
        try:
            delay = float(resp.headers.get("Retry-After", "1"))
        except ValueError:
            delay = 1.0
        time.sleep(min(max(delay, 0.1), MAX_RETRY_AFTER))


def summary(result: WarmResult, keys: int, todo: int, url: str) -> str:
    rate = result.done / result.elapsed if result.elapsed else 0.0
    lines = [f"warmed {keys} keys ({todo} renditions) through {url} in {result.elapsed:.1f} s ({rate:.1f}/s)"]
    cache = ", ".join(f"{status} {n}" for status, n in sorted(result.cache.items()))
    lines.append(f"  done: {result.done}" + (f" ({cache})" if cache else ""))
    errors = ", ".join(f"{status}: {n}" for status, n in sorted(result.errors.items()))
    lines.append(f"  errors: {sum(result.errors.values())}" + (f" ({errors})" if errors else ""))
    if result.retries:
        lines.append(f"  503 retried: {result.retries}")
    return "\n".join(lines)
