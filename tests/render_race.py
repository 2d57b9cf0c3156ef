"""Renders one original at every preset and output form concurrently, as production does, and compares every body
with the same render done alone. Run as a script (tests/test_concurrency.py does) so that ``--gevent`` can
monkey-patch before anything else is imported: then renders go through the gevent thread pool the app uses.

Prints one JSON line: {"compared": N, "differed": M, "originals": O, "forms": F, "failed_alone": X, "examples": [...]}.
"""

from __future__ import annotations

import sys

if "--gevent" in sys.argv:
    from gevent import monkey

    monkey.patch_all()

import functools
import io
import json

from PIL import Image

from service.config import load_config
from service.formats import ORIENTATION_TAG
from service.offload import make_spawn
from service.original import content_digest
from service.pipeline import Pipeline
from tests.support import CORPUS

CONFIG = load_config(environ={"PHIZER_ORIGINS": "file:///nonexistent"})
# Every output form a request can ask for: negotiated to nothing, WebP or AVIF, and each URL-forced format.
FORMS = [("", None), ("webp", None), ("avif", None), ("", "jpeg"), ("", "png"), ("", "webp"), ("", "gif"), ("", "avif")]


def originals() -> dict[str, bytes]:
    """Small originals (64x40: smaller than every preset box, so most presets need no resize at all: the path on
    which a kept intermediate used to reach the encoders), in each input format; and JPEGs whose renders share more
    than an intermediate: a cached colour transform (the corpus' Adobe RGB and CMYK profiles), an EXIF rotation."""
    gradient = Image.linear_gradient("L").resize((64, 40))
    rgb = Image.merge("RGB", (gradient, gradient.transpose(Image.Transpose.FLIP_LEFT_RIGHT), gradient.rotate(90)))
    rgba = rgb.copy()
    rgba.putalpha(gradient)
    adobe_rgb = Image.open(CORPUS / "11_cups_adobergb.jpg").info["icc_profile"]
    cmyk_profile = Image.open(CORPUS / "09_fallenleaf_cmyk.jpg").info["icc_profile"]
    rotated = Image.Exif()
    rotated[ORIENTATION_TAG] = 6
    files = {}
    for name, im, fmt, options in [
        ("jpeg", rgb, "JPEG", {"quality": 95}),
        ("png-alpha", rgba, "PNG", {}),
        ("webp", rgb, "WEBP", {"quality": 90}),
        ("gif-animated", rgb.convert("P"), "GIF", {"save_all": True, "append_images": [rgb.rotate(180).convert("P")]}),
        ("jpeg-adobe-rgb-rotated", rgb, "JPEG", {"icc_profile": adobe_rgb, "exif": rotated.tobytes()}),
        ("jpeg-cmyk-profile", rgb.convert("CMYK"), "JPEG", {"icc_profile": cmyk_profile}),
    ]:
        out = io.BytesIO()
        im.save(out, fmt, **options)
        files[name] = out.getvalue()
    return files


def main() -> None:
    repetitions = int(sys.argv[sys.argv.index("--repetitions") + 1])
    spawn = make_spawn(4)  # the app's own way onto render threads
    jobs = [
        (name, data, preset, negotiated, forced)
        for name, data in originals().items()
        for preset in CONFIG.presets.values()
        for negotiated, forced in FORMS
    ]

    def render(pipeline: Pipeline, job: tuple) -> bytes:
        _, data, preset, negotiated, forced = job
        digest = content_digest(data)  # as the app computes it
        try:
            return pipeline.render(data, digest, preset, negotiated=negotiated, forced_format=forced).body
        except Exception as exc:  # settings mixed up by a shared image can also make the encoder fail
            return f"failed: {exc!r}".encode()

    alone = [render(Pipeline(CONFIG.encoding, CONFIG.limits), job) for job in jobs]
    compared, differed, examples = 0, 0, []
    for _ in range(repetitions):
        shared = Pipeline(CONFIG.encoding, CONFIG.limits)  # one instance's pipeline: intermediates shared
        render_one = functools.partial(render, shared)
        if "--gevent" in sys.argv:
            import gevent

            on_thread = [functools.partial(spawn, functools.partial(render_one, job)) for job in jobs]
            greenlets = [gevent.spawn(lambda start=start: start().get()) for start in on_thread]
            gevent.joinall(greenlets, raise_error=True)
            bodies = [g.value for g in greenlets]
        else:
            from concurrent.futures import ThreadPoolExecutor

            with ThreadPoolExecutor(8) as pool:
                bodies = list(pool.map(render_one, jobs))
        for job, body, expected in zip(jobs, bodies, alone, strict=True):
            compared += 1
            if body != expected:
                differed += 1
                if len(examples) < 5:
                    examples.append([job[0], job[2].name, job[3], job[4], len(body), len(expected)])
    result = {"compared": compared, "differed": differed, "originals": len(originals()), "forms": len(FORMS)}
    result["failed_alone"] = sum(body.startswith(b"failed: ") for body in alone)  # equal failures prove nothing
    print(json.dumps({**result, "examples": examples}))


if __name__ == "__main__":
    main()
