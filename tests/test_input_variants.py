"""Real-world variants of the four input formats that Pillow opens or labels differently: each is served, by the
pipeline and through the real stack (nginx, gunicorn, memcached).

Generated files, each with a known colour, so a test can tell the right picture (an MPO's first image, not its
second; every frame of a GIF with its own palette) from a wrong one.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Callable, Iterator

import pytest
import requests
from PIL import Image, ImageStat

from service import pipeline
from service.errors import UnsupportedMedia
from service.launcher import Stack
from service.pipeline import Pipeline
from service.presets import Preset
from service.procs import free_port
from tests.imaging import DEFAULT_CONFIG, decode, render

PIPELINE = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
SMALL = Preset("small", 160)
RED, BLUE, GREEN = (220, 30, 30), (30, 30, 220), (30, 200, 30)


def picture(colour: tuple[int, int, int], mode: str = "RGB", size: tuple[int, int] = (400, 300)) -> Image.Image:
    """A flat colour with a contrasting square, so a real encoder has edges to work on."""
    im = Image.new(mode, size, colour if mode == "RGB" else (*colour, 255))
    im.paste((255, 255, 255) if mode == "RGB" else (255, 255, 255, 255), (150, 100, 250, 200))
    return im


def saved(im: Image.Image, fmt: str, **options: object) -> bytes:
    out = io.BytesIO()
    im.save(out, fmt, **options)
    return out.getvalue()


def mean(im: Image.Image) -> tuple[float, ...]:
    return tuple(ImageStat.Stat(im.convert("RGB")).mean)


def close_to(actual: tuple[float, ...], colour: tuple[int, int, int], tolerance: float = 40) -> bool:
    """The mean of a picture() (a quarter of it is the white square) is near its colour's."""
    expected = [c * 0.917 + 255 * 0.083 for c in colour]  # the square covers 100x100 of 400x300
    return all(abs(a - e) <= tolerance for a, e in zip(actual, expected, strict=True))


def jfxx_jpeg() -> bytes:
    """A JPEG carrying a JFXX extension segment (an APP0 "JFXX" with its own JPEG thumbnail) after JFIF's."""
    data = saved(picture(RED), "JPEG", quality=90)
    thumb = saved(picture(BLUE, size=(40, 30)), "JPEG")
    body = b"JFXX\0\x10" + thumb
    segment = b"\xff\xe0" + struct.pack(">H", len(body) + 2) + body
    jfif_end = 4 + struct.unpack(">H", data[4:6])[0]  # SOI, then JFIF's APP0 (marker + length + body)
    assert data[2:4] == b"\xff\xe0" and data[6:10] == b"JFIF"
    return data[:jfif_end] + segment + data[jfif_end:]


def gif_with_local_palettes() -> bytes:
    """Three frames whose palettes differ, so each frame gets its own local colour table."""
    frames = [picture(colour).quantize(colors=4) for colour in (RED, GREEN, BLUE)]
    return saved(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0, optimize=False)


def apng(default_image: bool = False) -> bytes:
    """Red, green, blue frames; with ``default_image`` the red one is the default image, outside the animation."""
    frames = [picture(RED), picture(GREEN), picture(BLUE)]
    return saved(frames[0], "PNG", save_all=True, append_images=frames[1:], default_image=default_image, duration=100)


def webp_with_alpha() -> bytes:
    im = picture(RED, "RGBA")
    im.putalpha(Image.linear_gradient("L").resize(im.size))
    return saved(im, "WEBP", lossless=True)


# Through the real stack: name -> (the file, the colour of the first frame played, frames as WebP, format for
# clients that take neither WebP nor AVIF).
VARIANTS: dict[str, tuple[Callable[[], bytes], tuple[int, int, int], int, str]] = {
    "mpo.jpg": (lambda: saved(picture(RED), "MPO", save_all=True, append_images=[picture(BLUE)]), RED, 1, "JPEG"),
    "jfxx.jpg": (jfxx_jpeg, RED, 1, "JPEG"),
    "apng.png": (apng, RED, 3, "GIF"),
    "apng-hidden-default.png": (lambda: apng(default_image=True), GREEN, 2, "GIF"),
    "lossless-alpha.webp": (webp_with_alpha, RED, 1, "PNG"),
    "lossless.webp": (lambda: saved(picture(RED), "WEBP", lossless=True), RED, 1, "JPEG"),
    "local-palettes.gif": (gif_with_local_palettes, RED, 3, "GIF"),
}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    state = tmp_path_factory.mktemp("variants")
    folder = state / "originals"
    folder.mkdir()
    for name, (make, *_) in VARIANTS.items():
        (folder / name).write_bytes(make())
    with Stack(state / "stack", port=free_port(), instances=1, env={"PHIZER_ORIGINS": f"file://{folder}"}) as started:
        yield started


def test_every_variant_is_served_through_the_stack(stack: Stack) -> None:
    """Each variant through nginx, gunicorn and memcached: WebP for browsers that take it (animations animated),
    the plain fallback format for the others, the right picture first."""
    for name, (_, colour, frames, fallback) in VARIANTS.items():
        for accept, fmt, count in (
            ("image/webp,*/*", "WEBP", frames),
            ("*/*", fallback, frames if fallback == "GIF" else 1),
        ):
            resp = requests.get(f"{stack.url}/small/{name}", headers={"Accept": accept}, timeout=30)
            assert resp.status_code == 200, (name, accept, resp.text)
            out = decode(resp.content)
            assert (out.format, getattr(out, "n_frames", 1)) == (fmt, count), (name, accept)
            assert close_to(mean(out), colour), (name, accept, mean(out))


def test_mpo_is_served_as_its_first_jpeg() -> None:
    data = saved(picture(RED), "MPO", save_all=True, append_images=[picture(BLUE)], quality=90)
    assert Image.open(io.BytesIO(data)).format == "MPO"  # what Pillow calls it: it used to be a 500
    for negotiated, fmt in (("", "jpeg"), ("webp", "webp")):
        rendition = render(PIPELINE, data, SMALL, negotiated=negotiated)
        out = decode(rendition.body)
        assert (rendition.format, out.size, getattr(out, "n_frames", 1)) == (fmt, (160, 120), 1)
        assert close_to(mean(out), RED)


def test_a_label_we_have_no_rules_for_is_a_415_not_a_500(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's decoders may label a variant of their format differently (the JPEG decoder says "MPO"): a label
    without rules of ours is refused as unsupported, never a KeyError further down."""
    data = saved(picture(RED), "MPO", save_all=True, append_images=[picture(BLUE)])
    monkeypatch.delitem(pipeline.SOURCE_FORMATS, "MPO")
    with pytest.raises(UnsupportedMedia) as refused:
        render(PIPELINE, data, SMALL)
    assert refused.value.detail == "Pillow labels it 'MPO'"


def test_mpo_uses_shrink_on_load() -> None:
    data = saved(picture(RED, size=(2400, 1800)), "MPO", save_all=True, append_images=[picture(BLUE)])
    ctx = PIPELINE.plan(data, SMALL)
    assert ctx.source_format == "jpeg" and ctx.frames == 0
    assert PIPELINE.intermediate(ctx, None).scale > 1  # drafted like any JPEG


def test_jfxx_jpeg_is_served() -> None:
    data = jfxx_jpeg()
    out = decode(render(PIPELINE, data, SMALL).body)
    assert out.size == (160, 120) and close_to(mean(out), RED)


def test_apng_stays_animated_as_webp_and_is_a_still_as_png() -> None:
    frames = [picture(RED), picture(GREEN), picture(BLUE)]
    data = saved(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=[100, 200, 300], loop=0)
    webp = decode(render(PIPELINE, data, SMALL, negotiated="webp").body)
    assert (webp.format, webp.n_frames, webp.size) == ("WEBP", 3, (160, 120))
    colours = []
    for index in range(3):
        webp.seek(index)
        colours.append(mean(webp))
    assert [close_to(c, colour) for c, colour in zip(colours, (RED, GREEN, BLUE), strict=True)] == [True] * 3
    still = decode(render(PIPELINE, data, SMALL, forced_format="png").body)
    assert (still.format, getattr(still, "n_frames", 1)) == ("PNG", 1) and close_to(mean(still), RED)


def test_apng_hidden_default_image_is_not_a_frame() -> None:
    """An APNG may keep its default image (what viewers without APNG show) out of the animation: browsers play only
    the frames after it. Pillow counts it as frame 0 all the same; it must not become the first frame we play."""
    frames = [picture(RED), picture(GREEN), picture(BLUE)]
    data = saved(frames[0], "PNG", save_all=True, append_images=frames[1:], default_image=True, duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 3  # what Pillow says
    for negotiated, fmt in (("webp", "WEBP"), ("", "GIF")):
        out = decode(render(PIPELINE, data, SMALL, negotiated=negotiated).body)
        assert (out.format, out.n_frames) == (fmt, 2)
        for index, colour in enumerate((GREEN, BLUE)):
            out.seek(index)
            assert close_to(mean(out), colour), (fmt, index, mean(out))
    still = decode(render(PIPELINE, data, SMALL, forced_format="png").body)
    assert close_to(mean(still), RED)  # as a still, the file's default image
    # Two frames, one of them hidden: a still, not a one-frame animation.
    single = saved(frames[0], "PNG", save_all=True, append_images=frames[1:2], default_image=True, duration=100)
    out = decode(render(PIPELINE, single, SMALL, negotiated="webp").body)
    assert (out.format, getattr(out, "n_frames", 1)) == ("WEBP", 1) and close_to(mean(out), RED)


@pytest.mark.parametrize("lossless", [True, False], ids=["lossless", "lossy"])
def test_webp_with_alpha_keeps_it_and_flattens_for_jpeg(lossless: bool) -> None:
    im = picture(BLUE, "RGBA")
    im.putalpha(Image.linear_gradient("L").resize(im.size))
    data = saved(im, "WEBP", lossless=lossless, quality=90)
    for negotiated, fmt, mode in (("webp", "WEBP", "RGBA"), ("", "PNG", "RGBA")):
        out = decode(render(PIPELINE, data, SMALL, negotiated=negotiated).body)
        assert (out.format, out.mode, out.size) == (fmt, mode, (160, 120))
        assert out.getchannel("A").getextrema()[0] < 30  # the transparent edge survived
    jpeg = decode(render(PIPELINE, data, SMALL, forced_format="jpeg").body)
    assert (jpeg.format, jpeg.mode) == ("JPEG", "RGB") and jpeg.getpixel((80, 2))[0] > 200  # flattened on white


def test_webp_lossless_opaque() -> None:
    data = saved(picture(GREEN), "WEBP", lossless=True)
    out = decode(render(PIPELINE, data, SMALL).body)
    assert (out.format, out.size) == ("JPEG", (160, 120)) and close_to(mean(out), GREEN)


def test_gif_with_a_local_palette_per_frame_keeps_each_frames_colours() -> None:
    data = gif_with_local_palettes()
    for negotiated, fmt in (("", "GIF"), ("webp", "WEBP")):
        out = decode(render(PIPELINE, data, SMALL, negotiated=negotiated).body)
        assert (out.format, out.n_frames) == (fmt, 3)
        for index, colour in enumerate((RED, GREEN, BLUE)):
            out.seek(index)
            assert close_to(mean(out), colour), (fmt, index, mean(out))
