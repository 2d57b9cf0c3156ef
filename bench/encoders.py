"""Encoder curves: bytes, encode time and SSIM per encoder setting, to choose defaults on a measured curve.

    .venv/bin/python -m bench.encoders [--photos 01,02,05,07] [--sizes 320,1600] [--repeat 3]

Each corpus photo is rendered by the pipeline itself (draft, reduce, LANCZOS, orientation, sRGB: the pixels a
rendition really encodes) to fit each size, then encoded with every setting: JPEG at the repo's save options
(service/formats.py) at q 60/70/82/90, WebP q82 at methods 0-6, AVIF (pillow-avif-plugin, when installed) at
speeds 4/6/8/9/10 and qualities 40-90. SSIM is measured on luma against the resized source, in 8x8 blocks
(``ssim``: Pillow only, no numpy). Writes bench/results/encoders.md: the tables, each AVIF speed's quality mapping
from the presets' JPEG-scale quality (least squares over q 60/70/82/90, matching SSIM), and the choices the rules
in ``decide`` make from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageMath

from service.config import Encoding
from service.formats import save_options
from service.pipeline import Pipeline
from service.presets import Preset
from tests.imaging import DEFAULT_CONFIG
from tests.support import CORPUS

try:
    import pillow_avif  # noqa: F401  (registers the AVIF plugin with Pillow)

    HAVE_AVIF = True
except ImportError:
    HAVE_AVIF = False

RESULTS = Path(__file__).resolve().parent / "results" / "encoders.md"
PHOTOS = ("01", "02", "05", "07")  # 20 MP baseline, 16 MP progressive, 2.5 MP camera, 4 MP phone
JPEG_QUALITIES = (60, 70, 82, 90)  # the mapping's points; 82 is the presets' default
WEBP_METHODS = tuple(range(7))
WEBP_QUALITIES = (76, 82, 88)  # around the presets' q82, so methods are compared at equal SSIM, not equal q
AVIF_SPEEDS = (4, 6, 8, 9, 10)
AVIF_QUALITIES = tuple(range(40, 95, 5))
REFERENCE_QUALITY = 82
BYTES_SLACK = 0.05  # WebP: the fastest method within 5% of method 4's bytes at equal SSIM (libwebp's default)
MEASURABLY = 0.10  # WebP: another method replaces method 4 only if at least 10% faster (else it is noise)
AVIF_SAVING = 0.10  # AVIF must save at least 10% of WebP's bytes at equal SSIM to be worth its encode time
TIME_BUDGET = 1.0  # seconds per setting and image: AVIF at speed 4 takes seconds per 1600 px photo, so fewer repeats
C1, C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


@dataclasses.dataclass(frozen=True)
class Setting:
    """One encoder configuration."""

    fmt: str  # "jpeg" | "webp" | "avif"
    quality: int
    effort: int | None = None  # WebP method, AVIF speed

    @property
    def label(self) -> str:
        extra = {"webp": f" m{self.effort}", "avif": f" s{self.effort}"}.get(self.fmt, "")
        return f"{self.fmt} q{self.quality}{extra}"

    def options(self, pixels: int) -> dict[str, object]:
        if self.fmt == "avif":
            return {"quality": self.quality, "speed": self.effort}
        encoding = Encoding() if self.effort is None else dataclasses.replace(Encoding(), webp_method=self.effort)
        return save_options(self.fmt, self.quality, pixels, encoding, None)


@dataclasses.dataclass(frozen=True)
class Result:
    """A setting's figures on one photo at one size."""

    setting: Setting
    photo: str
    size: int
    bytes: int
    encode_ms: float  # median of the repeats
    ssim: float


def default_settings() -> list[Setting]:
    settings = [Setting("jpeg", q) for q in JPEG_QUALITIES]
    settings += [Setting("webp", q, m) for m in WEBP_METHODS for q in WEBP_QUALITIES]
    if HAVE_AVIF:
        settings += [Setting("avif", q, s) for s in AVIF_SPEEDS for q in AVIF_QUALITIES]
    return settings


def ssim(a: Image.Image, b: Image.Image) -> float:
    """Mean SSIM of two same-sized images' luma over non-overlapping 8x8 blocks (block means by ``reduce``)."""
    x, y = a.convert("L").convert("F"), b.convert("L").convert("F")

    def product(p: Image.Image, q: Image.Image) -> Image.Image:
        return ImageMath.lambda_eval(lambda v: v["p"] * v["q"], p=p, q=q).reduce(8)

    mx, my, xx, yy, xy = x.reduce(8), y.reduce(8), product(x, x), product(y, y), product(x, y)
    blocks = ImageMath.lambda_eval(
        lambda v: ((v["mx"] * v["my"] * 2 + C1) * ((v["xy"] - v["mx"] * v["my"]) * 2 + C2))
        / ((v["mx"] * v["mx"] + v["my"] * v["my"] + C1)
           * (v["xx"] - v["mx"] * v["mx"] + v["yy"] - v["my"] * v["my"] + C2)),
        mx=mx, my=my, xx=xx, yy=yy, xy=xy,
    )  # fmt: skip
    return float(blocks.reduce(blocks.size).getpixel((0, 0)))  # type: ignore[arg-type]


def resized(data: bytes, size: int) -> Image.Image:
    """The photo as the pipeline renders it to fit ``size`` px wide (the pixels an encoder really gets)."""
    pipeline = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
    return pipeline.still(pipeline.plan(data, Preset(f"w{size}", size)), None).convert("RGB")


def encode(image: Image.Image, setting: Setting) -> tuple[bytes, float]:
    """``image`` encoded with ``setting``: the bytes and the seconds it took."""
    out = io.BytesIO()
    image = image.copy()  # save() writes its options onto the image object
    started = time.perf_counter()
    image.save(out, setting.fmt.upper(), **setting.options(image.width * image.height))
    return out.getvalue(), time.perf_counter() - started


def measure(photos: dict[str, bytes], sizes: Sequence[int], settings: Sequence[Setting], repeat: int) -> list[Result]:
    """Every setting on every photo at every size. The repeats go round-robin over the settings, so a burst of
    load on this shared machine lands on all of them alike rather than on whichever ran at that moment."""
    results = []
    for photo, data in photos.items():
        for size in sizes:
            source = resized(data, size)
            times: dict[Setting, list[float]] = {setting: [] for setting in settings}
            bodies: dict[Setting, bytes] = {}
            for _ in range(repeat):
                for setting, spent in times.items():
                    if sum(spent) < TIME_BUDGET:
                        bodies[setting], seconds = encode(source, setting)
                        spent.append(seconds)
            for setting in settings:
                body = bodies[setting]
                score = ssim(source, Image.open(io.BytesIO(body)))
                median = statistics.median(times[setting]) * 1000
                results.append(Result(setting, photo, size, len(body), median, score))
    return results


@dataclasses.dataclass(frozen=True)
class Curve:
    """A setting's means over the photos at one size."""

    setting: Setting
    size: int
    kb: float
    encode_ms: float
    ssim: float


def curves(results: Sequence[Result]) -> list[Curve]:
    groups: dict[tuple[Setting, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.setting, r.size), []).append(r)
    return [
        Curve(s, size, statistics.mean(r.bytes for r in rs) / 1000, statistics.mean(r.encode_ms for r in rs),
              statistics.mean(r.ssim for r in rs))
        for (s, size), rs in groups.items()
    ]  # fmt: skip


def matching_quality(points: Sequence[Curve], target: float) -> float | None:
    """The quality (interpolated linearly between grid points) whose mean SSIM equals ``target``."""
    points = sorted(points, key=lambda c: c.setting.quality)
    for lo, hi in itertools.pairwise(points):
        if lo.ssim <= target <= hi.ssim and hi.ssim > lo.ssim:
            return lo.setting.quality + (target - lo.ssim) / (hi.ssim - lo.ssim) * (
                hi.setting.quality - lo.setting.quality
            )
    return None


def fit(pairs: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of y over x."""
    mx, my = statistics.mean(x for x, _ in pairs), statistics.mean(y for _, y in pairs)
    slope = sum((x - mx) * (y - my) for x, y in pairs) / sum((x - mx) ** 2 for x, _ in pairs)
    return slope, my - slope * mx


def interpolate(points: Sequence[Curve], quality: float, field: str) -> float:
    """``field`` of the curve at ``quality``, linear between the two nearest grid points."""
    points = sorted(points, key=lambda c: c.setting.quality)
    lo = max((c for c in points if c.setting.quality <= quality), key=lambda c: c.setting.quality, default=points[0])
    hi = min((c for c in points if c.setting.quality >= quality), key=lambda c: c.setting.quality, default=points[-1])
    if hi.setting.quality == lo.setting.quality:
        return float(getattr(lo, field))
    share = (quality - lo.setting.quality) / (hi.setting.quality - lo.setting.quality)
    return float(getattr(lo, field) + share * (getattr(hi, field) - getattr(lo, field)))


@dataclasses.dataclass(frozen=True)
class AvifSpeed:
    """One AVIF speed's place on the curve."""

    speed: int
    mapped: dict[int, float | None]  # JPEG quality -> the AVIF quality of equal mean SSIM
    fit: tuple[float, float] | None  # (slope, intercept) of that mapping, least squares
    like_webp: float | None  # the AVIF quality of the chosen WebP q82's mean SSIM
    kb: float | None  # at ``like_webp``: bytes and encode time, interpolated
    encode_ms: float | None


@dataclasses.dataclass(frozen=True)
class WebpMethod:
    """One WebP method at q82, and its bytes at the SSIM of method 4 at q82 (interpolated over its qualities)."""

    method: int
    q82: Curve
    kb_like_m4: float | None


@dataclasses.dataclass(frozen=True)
class Choices:
    webp: list[WebpMethod]
    webp_method: int | None
    avif: list[AvifSpeed]
    avif_speed: int | None


def decide(table: Sequence[Curve], size: int) -> Choices:
    """The choices at ``size`` px, by the rules the report states (WebP: ``BYTES_SLACK``, AVIF: ``AVIF_SAVING``)."""
    at = [c for c in table if c.size == size]
    jpeg = {c.setting.quality: c for c in at if c.setting.fmt == "jpeg"}
    by_method: dict[int, list[Curve]] = {}
    for c in at:
        if c.setting.fmt == "webp":
            by_method.setdefault(int(c.setting.effort or 0), []).append(c)
    q82 = {m: next((c for c in cs if c.setting.quality == REFERENCE_QUALITY), None) for m, cs in by_method.items()}
    webp, chosen = [], None
    reference = q82.get(4)
    if reference is not None:
        for method, points in sorted(by_method.items()):
            like = matching_quality(points, reference.ssim)
            kb = None if like is None else interpolate(points, like, "kb")
            if q82[method] is not None:
                webp.append(WebpMethod(method, q82[method], kb))  # type: ignore[arg-type]
        budget, faster = reference.kb * (1 + BYTES_SLACK), reference.encode_ms * (1 - MEASURABLY)
        fine = [w for w in webp if w.kb_like_m4 is not None and w.kb_like_m4 <= budget and w.q82.encode_ms <= faster]
        chosen = min(fine, key=lambda w: w.q82.encode_ms, default=next(w for w in webp if w.method == 4))
    speeds = []
    for speed in sorted({int(c.setting.effort or 0) for c in at if c.setting.fmt == "avif"}):
        points = [c for c in at if c.setting.fmt == "avif" and c.setting.effort == speed]
        mapped = {q: matching_quality(points, jpeg[q].ssim) for q in sorted(jpeg)}
        known = [(float(q), m) for q, m in mapped.items() if m is not None]
        like = matching_quality(points, chosen.q82.ssim) if chosen else None
        speeds.append(
            AvifSpeed(
                speed, mapped, fit(known) if len(known) >= 2 else None, like,
                None if like is None else interpolate(points, like, "kb"),
                None if like is None else interpolate(points, like, "encode_ms"),
            )
        )  # fmt: skip
    worth = [a for a in speeds if chosen and a.kb is not None and a.kb <= chosen.q82.kb * (1 - AVIF_SAVING)]
    fastest = min(worth, key=lambda a: a.encode_ms or 0.0, default=None)
    return Choices(webp, chosen.method if chosen else None, speeds, fastest.speed if fastest else None)


def report(results: Sequence[Result], photos: Sequence[str], repeat: int) -> str:
    table = curves(results)
    sizes = sorted({c.size for c in table})
    lines = [
        "# Encoder curves",
        "",
        f"`python -m bench.encoders`: photos {', '.join(photos)} of the corpus, rendered by the pipeline to fit "
        f"{' and '.join(map(str, sizes))} px, each setting encoded up to {repeat}x (median time; fewer repeats "
        f"past {TIME_BUDGET:.0f} s). Means over the photos. SSIM: luma, 8x8 blocks, against the rendered source. "
        "Noisy 2-core machine: compare times within a table, not across runs.",
        "",
        "Rules (bench/encoders.py `decide`): WebP: the fastest method (encode time at q82) whose bytes at the SSIM "
        f"of method 4 at q82 (libwebp's default; interpolated over q{', q'.join(map(str, WEBP_QUALITIES))}) are within "
        f"{BYTES_SLACK:.0%} of method 4's and which is at least {MEASURABLY:.0%} faster, else method 4. "
        "AVIF: the fastest speed that, at the SSIM of the chosen WebP q82, takes at least "
        f"{AVIF_SAVING:.0%} fewer bytes than WebP (else AVIF is "
        "not worth its encode time); "
        "its quality mapping from the presets' JPEG-scale quality is the least-squares line through the AVIF "
        f"qualities of equal SSIM to JPEG q{', q'.join(map(str, JPEG_QUALITIES))}.",
        "",
    ]
    for size in sizes:
        at = sorted(
            (c for c in table if c.size == size),
            key=lambda c: (c.setting.fmt, c.setting.effort or 0, c.setting.quality),
        )
        lines += [f"## {size} px", "", "| setting | KB | encode ms | SSIM |", "|---|---:|---:|---:|"]
        lines += [f"| {c.setting.label} | {c.kb:.1f} | {c.encode_ms:.1f} | {c.ssim:.4f} |" for c in at]
        choices = decide(table, size)
        lines += ["", f"### Choices at {size} px", ""]
        if choices.webp:
            lines += [
                f"- WebP method: {choices.webp_method}",
                "",
                "| WebP method | KB at q82 | encode ms at q82 | SSIM at q82 | KB at method 4's q82 SSIM |",
                "|---|---:|---:|---:|---:|",
            ]
            for w in choices.webp:
                kb = "-" if w.kb_like_m4 is None else f"{w.kb_like_m4:.1f}"
                lines.append(f"| {w.method} | {w.q82.kb:.1f} | {w.q82.encode_ms:.1f} | {w.q82.ssim:.4f} | {kb} |")
            lines.append("")
        if choices.avif:
            lines += [
                "- AVIF speed: " + ("none saves enough" if choices.avif_speed is None else str(choices.avif_speed)),
                "",
                "| AVIF speed | q of equal SSIM to JPEG " + " / ".join(f"q{q}" for q in JPEG_QUALITIES)
                + " | mapping | q like WebP q82 | KB there | encode ms there |",
                "|---|---|---|---:|---:|---:|",
            ]  # fmt: skip
            for a in choices.avif:
                mapped = " / ".join("-" if m is None else f"{m:.0f}" for m in a.mapped.values())
                line = "-" if a.fit is None else f"{a.fit[0]:.2f} x q {a.fit[1]:+.1f}"
                there = (
                    ("-", "-", "-")
                    if a.like_webp is None
                    else (f"{a.like_webp:.0f}", f"{a.kb:.1f}", f"{a.encode_ms:.0f}")
                )
                lines.append(f"| {a.speed} | {mapped} | {line} | {' | '.join(there)} |")
        lines.append("")
    lines += decision(table, sizes)
    return "\n".join(lines)


def decision(table: Sequence[Curve], sizes: Sequence[int]) -> list[str]:
    """The defaults to apply: the choices at the largest size (where encoding costs most), and the chosen AVIF
    speed's quality mapping fitted over every size's points together."""
    final = decide(table, max(sizes))
    lines = ["## Decision", ""]
    if final.webp_method is not None:
        lines.append(f"- `encoding.webp_method`: {final.webp_method} (the choice at {max(sizes)} px).")
    if final.avif_speed is not None:
        pooled = [
            (float(q), m)
            for size in sizes
            for a in decide(table, size).avif
            if a.speed == final.avif_speed
            for q, m in a.mapped.items()
            if m is not None
        ]
        slope, intercept = fit(pooled)
        examples = ", ".join(f"q{q} -> {round(slope * q + intercept)}" for q in (80, 82, 85))
        lines.append(
            f"- AVIF: speed {final.avif_speed} (the choice at {max(sizes)} px); quality from the preset's JPEG-scale "
            f"q: round({slope:.2f} x q {intercept:+.1f}), fitted over both sizes ({examples})."
        )
    lines.append("")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", default=",".join(PHOTOS), help="corpus file prefixes, comma-separated")
    parser.add_argument("--sizes", default="320,1600")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from the saved .json")
    args = parser.parse_args(argv)
    raw = args.out.with_suffix(".json")
    if args.report_only:
        saved = json.loads(raw.read_text())
        names, repeat = saved["photos"], saved["repeat"]
        results = [Result(**{**r, "setting": Setting(**r["setting"])}) for r in saved["results"]]
    else:
        names = [next(CORPUS.glob(f"{prefix}_*")).name for prefix in args.photos.split(",")]
        photos = {name: (CORPUS / name).read_bytes() for name in names}
        results = measure(photos, [int(s) for s in args.sizes.split(",")], default_settings(), args.repeat)
        repeat = args.repeat
        args.out.parent.mkdir(parents=True, exist_ok=True)
        rows = ",\n".join(json.dumps(dataclasses.asdict(r)) for r in results)  # one result a line
        raw.write_text(f'{{"photos": {json.dumps(names)}, "repeat": {repeat}, "results": [\n{rows}\n]}}\n')
    args.out.write_text(report(results, names, repeat) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
