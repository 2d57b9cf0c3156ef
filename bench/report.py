"""Write bench/results/latest.json, latest.md and latest.png from one run's results.

The chart is drawn by bench/chart.py with the thumbor venv's matplotlib: matplotlib needs Pillow, which must
never be installed into phizer's .venv.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from bench.peer import THUMBOR_PYTHON

CHART = Path(__file__).with_name("chart.py")


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 5's targets, each with what was measured and whether it is met (None: not measured)."""
    rows = []

    def add(name: str, required: str, measured: Any, met: bool | None) -> None:
        rows.append({"target": name, "required": required, "measured": measured, "met": met})

    if "b1" in results:
        ratio = results["b1"]["median_ratio"]
        add("B1 cache hit vs nginx static, configured like phizer's", ">= 0.9x", f"{ratio}x", ratio >= 0.9)
        if "sendfile" in results["b1"]:
            stock = results["b1"]["sendfile"]["median_ratio"]
            add("B1 cache hit vs a stock static nginx (sendfile)", "(reported)", f"{stock}x", None)
    goals = {("b2", "thumbor"): 2.0, ("b2", "ipx"): 1.8, ("b3", "thumbor"): 1.3, ("b3", "ipx"): 1.2}
    for scenario, title in (("b2", "B2 page mix"), ("b3", "B3 single-preset misses")):
        for v in results.get(scenario, {}).get("variants", []):
            goal = goals.get((scenario, v["peer"]))
            if not v["equal"] or goal is None:
                continue
            name = f"{title} vs {v['peer']}, {v['format'].upper()}, equal settings"
            add(name, f">= {goal}x", f"{v['median_ratio']}x", v["median_ratio"] >= goal)
            if scenario == "b2":
                p99 = v["median_p99_ratio"]
                add(f"{name}: p99", "not worse (<= 1.0x)", f"{p99}x", p99 <= 1.0)
    if "b4" in results:
        ratio = results["b4"]["median_ratio"]
        add("B4 cold page vs 200 ms + CPU/cores", "<= 1.3x", f"{ratio}x", ratio <= 1.3)
    if "b5" in results:
        worst = results["b5"]["max_median_overhead"]
        add("B5 stack overhead vs in-process", "<= 15%", f"{worst * 100:.1f}%", worst <= 0.15)
    if "b7" in results:
        for peer, ratio in results["b7"]["median_ratio"].items():
            add(f"B7 cold page in Chromium vs {peer}", "<= 0.75x", f"{ratio}x", ratio <= 0.75)
    if "memory" in results:
        rss = results["memory"]["max_instance_rss_mb"]
        add("RSS per instance after the run", "<= 300 MB", f"{rss} MB", rss <= 300)
        peak = results["memory"].get("max_instance_peak_rss_mb")
        if peak is not None:
            add("RSS per instance: its worker's peak during the run", "(reported)", f"{peak} MB", None)
    return rows


def _paired_table(rows: list[dict[str, Any]], peer: str) -> list[str]:
    out = [
        f"| round | phizer req/s | p50 ms | p99 ms | CPU ms/req | {peer} req/s | p50 ms | p99 ms | CPU ms/req "
        "| ratio req/s | ratio p99 | CPU per req, peer/phizer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        a, b = r["phizer"], r["peer"]
        out.append(
            f"| {r['round']} | {a['rps']:.1f} | {a['p50_ms']:.1f} | {a['p99_ms']:.1f} | {a['cpu_ms_per_request']:.2f} "
            f"| {b['rps']:.1f} | {b['p50_ms']:.1f} | {b['p99_ms']:.1f} | {b['cpu_ms_per_request']:.2f} "
            f"| {r['ratio']} | {r['p99_ratio']} | {r['cpu_ratio']} |"
        )
    return out


def _variants_section(
    title: str, data: dict[str, Any], note: str, mean_bytes: dict[str, Any], presets: str
) -> list[str]:
    """One row per variant (peer, format, settings): medians of the rounds for each side, side by side.

    ``mean_bytes`` is the check pass's (format -> presets -> side -> bytes); ``presets`` "all" or the one preset.
    """
    lines = [
        f"## {title}", "", note, "",
        "| peer | format | settings | phizer req/s | peer req/s | ratio req/s | phizer p50 / p99 ms "
        "| peer p50 / p99 ms | ratio p99 | phizer CPU ms/req | peer CPU ms/req | phizer mean bytes | peer mean bytes "
        "| bytes phizer/peer (median per rendition) | failed phizer / peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in data["variants"]:
        a, b = v["medians"]["phizer"], v["medians"]["peer"]
        sizes = mean_bytes.get(v["format"], {}).get(presets, {})
        side = f"{v['peer']}-{'equal' if v['equal'] else 'defaults'}"
        mine, theirs = sizes.get("phizer"), sizes.get(side)
        bytes_ratio = f"{round(mine / theirs, 3)} ({sizes[f'median_ratio_{side}']})" if mine and theirs else "n/a"
        failed = [sum(r[side]["errors"] for r in v["rounds"]) for side in ("phizer", "peer")]
        lines.append(
            f"| {v['peer']} | {v['format']} | {'equal' if v['equal'] else 'defaults'} | {a['ok_rps']:.1f} "
            f"| {b['ok_rps']:.1f} | **{v['median_ratio']}** | {a['p50_ms']:.0f} / {a['p99_ms']:.0f} "
            f"| {b['p50_ms']:.0f} / {b['p99_ms']:.0f} "
            f"| {v['median_p99_ratio']} | {a['cpu_ms_per_request']:.1f} | {b['cpu_ms_per_request']:.1f} "
            f"| {mine} | {theirs} | {bytes_ratio} | {failed[0]} / {failed[1]} |"
        )
    lines += ["", "req/s counts successful answers only (a 503 from phizer's render budget is not work done). Medians "
              "of the rounds; the ratio columns are medians of each round's side-by-side ratio. CPU per successful "
              "answer: all processes of each side, from /proc (the peers' nginx included). Mean bytes: every image "
              "at each of this scenario's presets once on each side, from the check pass: the same renditions "
              "everywhere. Per-round figures: latest.json."]
    if any(v["exhausted"] for v in data["variants"]):
        lines.append("**A run ran out of distinct URLs** before its time was up: raise `--pages`.")
    return [*lines, ""]


def _paired_section(title: str, data: dict[str, Any], peer: str, note: str) -> list[str]:
    lines = [f"## {title}", "", note, "", *_paired_table(data["rounds"], peer), ""]
    lines.append(
        f"Median ratio (phizer/{peer}): **{data['median_ratio']}x** req/s, {data['median_p99_ratio']}x p99; "
        f"{peer} spends {data['median_cpu_ratio']}x phizer's CPU time per request (all processes of each side, "
        "from /proc: the figure least disturbed by other work on the machine)."
    )
    if data["errors"]:
        lines.append(f"**{data['errors']} failed requests** (socket errors, timeouts or non-2xx) in these runs.")
    if data["exhausted"]:
        lines.append("**A run ran out of distinct URLs** before its time was up: raise `--pages`.")
    return [*lines, ""]


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    s = results["settings"]
    lines = [
        "# phizer bench: latest results",
        "",
        f"Run {results['started']} with `{results['command']}` ({results['elapsed_s']:.0f} s).",
        "",
        f"Machine: {m['cpu_model']}, {m['cores']} cores (AVX2: {m['cpu_avx2']}), {m['memory_gib']} GiB, {m['os']}, "
        f"Python {m['python']}; pillow-simd {m['pillow_simd_version']} built with AVX2: {m['pillow_simd_avx2']}. "
        f"Both sides pinned to CPUs {s['cpus']} with {s['instances']} processes each (phizer: gunicorn+gevent "
        f"instances behind nginx; thumbor {s['thumbor_version']}: single-process servers behind nginx, "
        f"least_conn; ipx {s['ipx_versions']['ipx']} (sharp {s['ipx_versions']['sharp']}, libvips "
        f"{s['ipx_versions']['libvips']}): one Node process behind nginx); wrk shares the same cores. "
        f"{s['rounds']} rounds of {s['duration_s']:g} s per side (B1: 5 s), "
        f"{s['connections']} connections, sides alternating. Load average (1/5/15 min) at start "
        f"{m['load_average_at_start']}, at end {m.get('load_average_at_end')}: anything above 0 is other work "
        "sharing these cores.",
        "",
        "## Targets (medians of the per-round ratios)",
        "",
        "| target | required | measured | met |",
        "|---|---|---|---|",
    ]
    for row in targets(results):
        met = {True: "yes", False: "**no**", None: "n/a"}[row["met"]]
        lines.append(f"| {row['target']} | {row['required']} | {row['measured']} | {met} |")
    lines.append("")
    for name, reason in results.get("failed", {}).items():
        lines += [f"**{name.upper()} failed**: {reason}", ""]
    formats = results.get("formats", {})
    if formats.get("failures"):
        lines += ["**Renditions that failed in the check pass:**", ""]
        lines += [f"- {f}" for f in formats["failures"]] + [""]
    if "b1" in results:
        b1 = results["b1"]
        lines += _paired_section(
            "B1 cache hit vs nginx static: a page of hits",
            b1,
            "static",
            f"Every corpus image at every preset as JPEG ({b1['urls']} renditions, {b1['mean_bytes']} bytes on "
            "average), each already in phizer's nginx cache (X-Cache-Status HIT), requested round and round "
            f"through phizer's nginx vs the same bytes as files from nginx configured like phizer's (no sendfile, one "
            f"256 KiB output buffer: bench/peer_nginx.conf.j2); {b1['connections']} connections. This is the "
            "target's figure.",
        )
        if "sendfile" in b1:
            lines += _paired_section(
                "B1 against a stock static nginx (sendfile)",
                b1["sendfile"],
                "static",
                "The same page of hits vs the same files sent with sendfile, as a stock static nginx does: its files "
                "start at offset 0, where sendfile does not stall; phizer's cache files cannot (bench/results/b1.md).",
            )
        one = b1["single"]
        lines += _paired_section(
            "B1 worst case: one small hit",
            one,
            "static",
            f"`{one['url']}` ({one['bytes']} bytes, a HIT) over and over vs the same bytes as a file: with so few "
            "bytes, the fixed cost of a proxy_cache hit over a file (bench/results/b1.md) is most of the work.",
        )
    webp_method = results["settings"].get("phizer_webp_method")
    settings_note = (
        f"Settings `equal`: the peer gets phizer's preset quality (WebP: phizer at libwebp method {webp_method}, "
        "thumbor's Pillow and sharp at their default 4: the bytes columns show any difference that makes); "
        "`defaults`: the peer at its own default quality (thumbor 80, sharp 80), phizer unchanged. phizer is "
        "asked with a format suffix (`/small/<key>.webp`), the peers with their format option; all misses, every "
        "side behind an nginx that stores what it answers."
    )
    if "b2" in results:
        lines += _variants_section(
            "B2 page mix, all misses",
            results["b2"],
            f"Every corpus image at every preset ({', '.join(results['b2']['presets'])}), shuffled page by page, "
            f"each URL once. {settings_note}",
            results.get("formats", {}).get("mean_bytes", {}),
            "all",
        )
    if "b3" in results:
        lines += _variants_section(
            "B3 single-preset misses",
            results["b3"],
            f"Distinct originals, each once, at preset `{results['b3']['preset']}`, JPEG. {settings_note}",
            results.get("formats", {}).get("mean_bytes", {}),
            results["b3"]["preset"],
        )
    if "b7" in results:
        b7 = results["b7"]
        sides = b7["sides"]
        lines += [
            "## B7 cold page in headless Chromium",
            "",
            f"A page of {b7['page_size']} `{b7['preset']}` thumbnails of distinct originals (content no cache has "
            "seen, under new names), opened in Debian's Chromium (headless, fresh profile each time, HTTP/1.1: 6 "
            "connections per host); the time is the page's own load event (all images loaded, from navigation "
            "start). phizer negotiates from Chromium's Accept (AVIF, its default for browsers); the peers are "
            "asked for WebP at the same quality.",
            "",
            "| round | " + " | ".join(f"{s} load ms" for s in sides)
            + "".join(f" | phizer/{p}" for p in sides[1:]) + " |",
            "|---|" + "---|" * (2 * len(sides) - 1),
        ]
        for r in b7["rounds"]:
            shown = [f"{r[s]['load_ms']}" + ("" if r[s]["decoded"] == b7["page_size"] else
                                              f" ({b7['page_size'] - r[s]['decoded']} images failed)") for s in sides]
            lines.append(f"| {r['round']} | " + " | ".join(shown) + "".join(f" | {r['ratio_' + p]}" for p in sides[1:])
                         + " |")
        lines += ["", "Median ratio: " + ", ".join(f"**{v}x** vs {p}" for p, v in b7["median_ratio"].items()) + ".", ""]
    if "b4" in results:
        b4 = results["b4"]
        lines += [
            "## B4 cold page from S3 behind a 200 ms proxy",
            "",
            f"{b4['page_size']} distinct originals (moto_server S3, every GET delayed {b4['delay_s'] * 1000:.0f} ms), "
            f"fetched at once with {b4['concurrency']} connections (an HTTP/2 browser's page load). Model: "
            f"{b4['delay_s'] * 1000:.0f} ms + {b4['cpu_seconds'] * 1000:.0f} ms CPU / {b4['cores']} cores = "
            f"**{b4['model_s'] * 1000:.0f} ms**. The originals alone through the proxy (40 parallel GETs, no "
            f"resizing): {b4['origin_only_page_s'] * 1000:.0f} ms. CPU on the same cores outside the model: the "
            "instances' beyond the model's renders, the S3 server's and the delay proxy's, the bench's 40 client "
            "threads'.",
            "",
            "| round | page ms | slowest request ms | page / model | not cold misses | CPU s per instance | "
            "S3 + proxy CPU s | client CPU s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in b4["rounds"]:
            lines.append(
                f"| {r['round']} | {r['page_s'] * 1000:.0f} | {r['slowest_s'] * 1000:.0f} | {r['ratio']} | "
                f"{r['not_cold_misses']} | {' / '.join(str(x) for x in r['instance_cpu_s'])} | "
                f"{r.get('origin_cpu_s', '-')} | {r.get('client_cpu_s', '-')} |"
            )
        lines += ["", f"Median page / model: **{b4['median_ratio']}x**.", ""]
    if "b5" in results:
        lines += [
            "## B5 stack overhead",
            "",
            "Sequential misses (one connection, new original each time, read from the file origin, memcached off as "
            "for every bench scenario but B4; the file is read untimed first so both halves start from the page "
            "cache) through nginx and an instance, each followed by `Pipeline.render` (built as the app builds it) "
            "called in-process on the same bytes; medians of wall time.",
            "",
            "| image | preset | round | stack ms | in-process ms | overhead |",
            "|---|---|---|---|---|---|",
        ]
        for case in results["b5"]["cases"]:
            for r in case["rounds"]:
                lines.append(
                    f"| {case['image']} | {case['preset']} | {r['round']} | {r['stack_ms']} | {r['in_process_ms']} "
                    f"| {r['overhead'] * 100:.1f}% |"
                )
        lines += [""]
        for case in results["b5"]["cases"]:
            lines.append(f"- {case['image']} at {case['preset']}: median overhead {case['median_overhead'] * 100:.1f}%")
        lines += [""]
    if "b6" in results:
        b6 = results["b6"]
        curves = b6["curves"]
        lines += [
            "## B6 CPU time per miss vs megapixels",
            "",
            f"In-process CPU time (best of 3) of one miss of `{b6['source']}` re-encoded at each size (baseline JPEG "
            "q90), then of the corpus JPEGs, each a new original (no intermediate to reuse). Chart: latest.png.",
            "",
            "| megapixels | " + " | ".join(f"{c} (CPU ms)" for c in curves) + " |",
            "|---|" + "---|" * len(curves),
        ]
        for point in b6["series"]:
            lines.append(f"| {point['megapixels']} | " + " | ".join(str(point[c]) for c in curves) + " |")
        lines += [
            "",
            f"Pixels grow {b6['pixel_growth']}x over the series; CPU time grows "
            + ", ".join(f"{b6['cpu_growth'][c]}x ({c})" for c in curves)
            + ".",
            "",
            "| corpus image | megapixels | " + " | ".join(f"{c} (CPU ms)" for c in curves) + " |",
            "|---|---|" + "---|" * len(curves),
        ]
        for point in b6["corpus"]:
            lines.append(
                f"| {point['image']} | {point['megapixels']} | " + " | ".join(str(point[c]) for c in curves) + " |"
            )
        lines += [""]
    if "memory" in results:
        mem = results["memory"]
        lines += [
            "## Memory after the run",
            "",
            "After the run, once the instances went idle (an idle worker gives its free heap back: service/memory.py);"
            " peak: the highest RSS of each instance's current worker during the run (VmHWM), with its master's.",
            "",
            "| process | RSS MB | peak RSS MB |",
            "|---|---|---|",
        ]
        for inst in mem["instances"]:
            peak = inst.get("peak_rss_mb", "")
            lines.append(f"| phizer {inst['name']} (master + worker) | {inst['rss_mb']} | {peak} |")
        lines.append(f"| memcached | {mem['memcached_rss_mb']} | |")
        lines.append(f"| phizer's nginx (all processes) | {mem['nginx_rss_mb']} | |")
        for i, rss in enumerate(mem["thumbor_rss_mb"]):
            lines.append(f"| thumbor-{i} | {rss} | |")
        lines += [""]
    if results.get("chart"):
        lines += ["![charts](latest.png)", ""]
    return "\n".join(lines)


def write(results: dict[str, Any], folder: Path) -> None:
    """latest.json, latest.png (if the thumbor venv's matplotlib can draw it) and latest.md."""
    folder.mkdir(parents=True, exist_ok=True)
    results["targets"] = targets(results)
    (folder / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    chart = subprocess.run(
        [str(THUMBOR_PYTHON), str(CHART), str(folder / "latest.json"), str(folder / "latest.png")],
        capture_output=True,
        text=True,
    )
    results["chart"] = chart.returncode == 0
    if not results["chart"]:
        print(f"chart not drawn: {chart.stderr.strip()[-500:]}", flush=True)
    (folder / "latest.json").write_text(json.dumps(results, indent=1) + "\n")
    (folder / "latest.md").write_text(markdown(results))
