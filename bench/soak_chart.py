"""Draw soak.png from soak.json: ``bench/.venv-thumbor/bin/python bench/soak_chart.py soak.json soak.png``.

Runs in the thumbor venv (matplotlib needs Pillow, which must stay out of phizer's .venv), so it imports
nothing from phizer. Left: RSS of each instance's gunicorn worker over the soak (bursts shaded, new worker pids
marked). Right: latency of hits and misses, minute by minute.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(source: str, target: str) -> None:
    results = json.loads(Path(source).read_text())
    series = [p for p in results["memory"]["series"] if p["t"] >= 0]
    names = [i["name"] for i in series[0]["instances"]]
    fig, axes = plt.subplots(1, 2, figsize=(15, 5), gridspec_kw={"width_ratios": [3, 2]})

    ax = axes[0]
    minutes = [p["t"] / 60 for p in series]
    for i, name in enumerate(names):
        ax.plot(minutes, [p["instances"][i]["rss_mb"] for p in series], color=f"C{i}", label=f"{name} worker")
    if all("memcached_rss_mb" in p for p in series):
        ax.plot(minutes, [p["memcached_rss_mb"] for p in series], color="grey", linestyle="--", label="memcached")
    for n, burst in enumerate(results["bursts"]):
        ax.axvspan(burst["t"] / 60, (burst["t"] + burst["seconds"]) / 60, color="red", alpha=0.15,
                   label="burst" if n == 0 else None)
    for n, start in enumerate(results["memory"]["worker_starts"]):
        ax.axvline(start["t"] / 60, color=f"C{start['instance']}", linestyle=":", linewidth=1,
                   label="new worker pid" if n == 0 else None)
    ax.set_xlabel("minutes into the soak")
    ax.set_ylabel("RSS, MB")
    ax.set_ylim(bottom=0)
    ax.set_title("RSS of each instance's gunicorn worker")
    ax.legend(fontsize="small", loc="lower right")

    ax = axes[1]
    per_minute = results["per_minute"]
    x = [pm["minute"] for pm in per_minute]
    for cls, color in (("miss", "C2"), ("hit", "C4")):
        for q, style in (("p50", "-"), ("p99", "--")):
            values = [pm[f"{cls}_{q}_ms"] for pm in per_minute]
            if any(v is not None for v in values):
                ax.plot(x, [float("nan") if v is None else v for v in values], color=color, linestyle=style,
                        marker="o", label=f"{cls} 200 {q}")
    ax.set_yscale("log")
    ax.set_xlabel("minute")
    ax.set_ylabel("ms")
    ax.set_title("Latency per minute")
    ax.legend(fontsize="small")

    s = results["settings"]
    fig.suptitle(f"phizer soak: {s['minutes']:g} min, {s['clients']} clients + bursts of {s['burst_size']}, "
                 f"{results['machine']['cpu_model']}, {results['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(target, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
