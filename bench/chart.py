"""Draw latest.png from latest.json: ``bench/.venv-thumbor/bin/python bench/chart.py latest.json latest.png``.

Runs in the thumbor venv (matplotlib needs Pillow, which must stay out of phizer's .venv), so it imports
nothing from phizer.
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
    fig, axes = plt.subplots(1, 3, figsize=(17, 5))

    ax = axes[0]
    # One bar series per comparison: B1, and each B2/B3 variant at equal encoder settings.
    paired = [("B1 hit/static", results["b1"]["rounds"])] if "b1" in results else []
    for key, label in (("b2", "B2"), ("b3", "B3")):
        paired += [(f"{label} {v['peer']} {v['format']}", v["rounds"])
                   for v in results.get(key, {}).get("variants", []) if v["equal"]]
    width = 0.8 / max(1, len(paired))
    for i, (label, rows) in enumerate(paired):
        ratios = [r["ratio"] for r in rows]
        ax.bar([x + i * width for x in range(len(ratios))], ratios, width, label=label)
    rounds = max((len(rows) for _, rows in paired), default=0)
    ax.set_xticks([x + width * (len(paired) - 1) / 2 for x in range(rounds)], [str(r + 1) for r in range(rounds)])
    for level, style in ((0.9, ":"), (1.2, "--"), (2.0, "-.")):
        ax.axhline(level, color="grey", linestyle=style, linewidth=0.8)
    ax.set_xlabel("round")
    ax.set_ylabel("throughput ratio phizer / peer")
    ax.set_title("Paired scenarios, equal settings (targets: 0.9, 1.2, 2.0)")
    ax.legend(fontsize="small")

    ax = axes[1]
    if "b6" in results:
        b6 = results["b6"]
        mps = [p["megapixels"] for p in b6["series"]]
        for i, curve in enumerate(b6["curves"]):
            color = f"C{i}"
            ax.plot(mps, [p[curve] for p in b6["series"]], marker="o", color=color, label=curve)
            ax.scatter([p["megapixels"] for p in b6["corpus"]], [p[curve] for p in b6["corpus"]], marker="x",
                       color=color)
        base = b6["series"][0][b6["curves"][0]]
        ax.plot(mps, [base * mp / mps[0] for mp in mps], color="grey", linestyle="--",
                label="proportional to pixels")
        ax.set_yscale("log")
        ax.set_xscale("log")
        ax.set_xlabel("source megapixels")
        ax.set_ylabel("CPU ms per miss (in-process)")
        ax.set_title("B6: CPU per miss vs source size (x = corpus JPEGs)")
        ax.legend(fontsize="small")

    ax = axes[2]
    if "b4" in results:
        b4 = results["b4"]
        pages = [r["page_s"] * 1000 for r in b4["rounds"]]
        ax.bar(range(1, len(pages) + 1), pages, label="page time")
        ax.set_xticks(range(1, len(pages) + 1))
        ax.axhline(b4["model_s"] * 1000, color="black", label="200 ms + CPU/cores")
        ax.axhline(b4["model_s"] * 1300, color="grey", linestyle="--", label="target (1.3x)")
        ax.axhline(b4["origin_only_page_s"] * 1000, color="tab:orange", linestyle=":", label="originals alone")
        ax.set_xlabel("round")
        ax.set_ylabel("ms")
        ax.set_title(f"B4: cold page of {b4['page_size']} originals from S3")
        ax.legend()

    fig.suptitle(f"phizer bench, {results['machine']['cpu_model']}, {results['machine']['cores']} cores")
    fig.tight_layout()
    fig.savefig(target, dpi=90)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
