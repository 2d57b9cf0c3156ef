"""Gravity, smart crops, the origin's focal point and ``fit: pad``.

A generated picture with an off-centre subject (a red disc on grey, at 15 %, 85 %) is stored under every EXIF
orientation and rendered: the subject must land where an independent restatement of the rule (plain floats, in the
upright picture's terms) puts it. Then the focal point end to end: from S3 user metadata through moto, a real
instance and memcached.
"""

from __future__ import annotations

import dataclasses
import io
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml
from PIL import ExifTags, Image, ImageChops, ImageDraw

from service.cache import MemcachedOriginals, origins_namespace
from service.config import ConfigError, Limits, MemcachedOptions, parse_config
from service.geometry import crop_box
from service.intermediates import Intermediate
from service.launcher import Stack
from service.original import Original
from service.pipeline import Pipeline
from service.presets import GRAVITIES, Preset
from service.procs import free_port
from service.saliency import salient_point
from tests import support
from tests.imaging import DEFAULT_CONFIG, decode, render
from tests.test_fidelity import STORE

W, H = 400, 200
SUBJECT = (60, 170)  # 15 %, 85 % of the upright picture
RADIUS = 15
GREY = (128, 128, 128)
# The gravities restated as the point the crop window is centred on (then slid back inside the picture).
POINTS = {
    "centre": (0.5, 0.5),
    "north": (0.5, 0.0),
    "south": (0.5, 1.0),
    "east": (1.0, 0.5),
    "west": (0.0, 0.5),
    "northeast": (1.0, 0.0),
    "northwest": (0.0, 0.0),
    "southeast": (1.0, 1.0),
    "southwest": (0.0, 1.0),
}
BOXES = [(100, 100), (100, 25)]  # a horizontal crop (the sides go) and a vertical one (top and bottom go)


def picture(mode: str = "RGB", background: Any = GREY) -> Image.Image:
    im = Image.new(mode, (W, H), background)
    x, y = SUBJECT
    ImageDraw.Draw(im).ellipse((x - RADIUS, y - RADIUS, x + RADIUS, y + RADIUS), fill="red")
    return im


def stored(im: Image.Image, orientation: int, fmt: str = "JPEG") -> bytes:
    """``im`` stored the way a camera would under EXIF ``orientation`` (so that displaying it gives ``im``)."""
    transpose = STORE[orientation]
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    out = io.BytesIO()
    (im if transpose is None else im.transpose(transpose)).save(out, fmt, exif=exif.tobytes(), quality=95)
    return out.getvalue()


def subject_centre(im: Image.Image) -> tuple[float, float] | None:
    """The centre of the red disc's bounding box in ``im``, or None when no red is left."""
    red, green, _ = im.convert("RGB").split()
    bbox = ImageChops.subtract(red, green).point(lambda v: 255 if v > 100 else 0).getbbox()
    return None if bbox is None else ((bbox[0] + bbox[2]) / 2, (bbox[1] + bbox[3]) / 2)


def expected_centre(box: tuple[int, int], point: tuple[float, float]) -> tuple[float, float] | None:
    """Where the disc's centre lands in a ``box`` cover crop centred on ``point``; None when the crop loses it."""
    if W * box[1] > H * box[0]:
        win_w, win_h = H * box[0] / box[1], float(H)
    else:
        win_w, win_h = float(W), W * box[1] / box[0]
    left = min(max(point[0] * W - win_w / 2, 0), W - win_w)
    top = min(max(point[1] * H - win_h / 2, 0), H - win_h)
    x, y = SUBJECT
    if x + RADIUS < left or x - RADIUS > left + win_w or y + RADIUS < top or y - RADIUS > top + win_h:
        return None
    scale = box[0] / win_w
    return (x - left) * scale, (y - top) * scale


def near(got: tuple[float, float] | None, want: tuple[float, float] | None, tolerance: float = 2.0) -> bool:
    if got is None or want is None:
        return got is want
    return abs(got[0] - want[0]) <= tolerance and abs(got[1] - want[1]) <= tolerance


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)


@pytest.fixture(scope="module")
def originals() -> dict[int, bytes]:
    return {orientation: stored(picture(), orientation) for orientation in range(1, 9)}


def cover(box: tuple[int, int], gravity: str = "centre") -> Preset:
    return Preset("crop", box[0], box[1], fit="cover", gravity=gravity, format="png")


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("box", BOXES, ids=lambda b: f"{b[0]}x{b[1]}")
def test_every_gravity_under_every_orientation(
    pipeline: Pipeline, originals: dict[int, bytes], box: tuple[int, int], orientation: int
) -> None:
    kept = 0
    for gravity, point in POINTS.items():
        out = decode(render(pipeline, originals[orientation], cover(box, gravity)).body)
        assert out.size == box
        want = expected_centre(box, point)
        assert near(subject_centre(out), want), (gravity, subject_centre(out), want)
        kept += want is not None
    assert kept == 3  # the subject's own side and corners keep it: west, southwest, northwest or south, sw, se


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("box", BOXES, ids=lambda b: f"{b[0]}x{b[1]}")
def test_smart_keeps_the_subject_whole(
    pipeline: Pipeline, originals: dict[int, bytes], box: tuple[int, int], orientation: int
) -> None:
    out = decode(render(pipeline, originals[orientation], cover(box, "smart")).body)
    # The crop is centred on the subject as far as the picture's edges allow: a focal point on it, restated.
    assert near(subject_centre(out), expected_centre(box, (SUBJECT[0] / W, SUBJECT[1] / H)))


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("gravity", ["north", "smart"])
def test_focus_overrides_gravity(
    pipeline: Pipeline, originals: dict[int, bytes], gravity: str, orientation: int
) -> None:
    """The focal point (upright fractions) wins over any gravity, smart included (here it points at empty grey)."""
    focus = (0.9, 0.2)
    for box in BOXES:
        out = decode(render(pipeline, originals[orientation], cover(box, gravity), focus=focus).body)
        assert near(subject_centre(out), expected_centre(box, focus)), (box, subject_centre(out))
    data = originals[orientation]
    focused = render(pipeline, data, cover(BOXES[0], gravity), focus=(0.15, 0.85)).body
    assert near(subject_centre(decode(focused)), expected_centre(BOXES[0], (0.15, 0.85)))


def test_smart_is_deterministic_and_centred_on_a_flat_picture() -> None:
    data = stored(picture(), 6)
    preset = cover((100, 100), "smart")
    fresh = [render(Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits), data, preset).body for _ in range(2)]
    shared = Pipeline(DEFAULT_CONFIG.encoding, DEFAULT_CONFIG.limits)
    kept = [render(shared, data, preset).body for _ in range(2)]  # the second from the kept intermediate
    assert fresh[0] == fresh[1] == kept[0] == kept[1]
    flat = stored(Image.new("RGB", (W, H), GREY), 1)
    assert salient_point(Intermediate(Image.new("RGB", (W, H), GREY), 1.0), (Fraction(1, 2), Fraction(1))) == (
        Fraction(1, 2),
        Fraction(1, 2),
    )
    assert render(shared, flat, preset).body == render(shared, flat, cover((100, 100))).body


def test_smart_reads_a_copy_and_leaves_the_intermediate_alone() -> None:
    im = picture()
    kept = Intermediate(im, 1.0)
    before = im.tobytes()
    assert salient_point(kept, (Fraction(1, 2), Fraction(1))) == (Fraction(1, 4), Fraction(1, 2))  # at the edge
    inner = Image.new("RGB", (W, H), GREY)
    ImageDraw.Draw(inner).ellipse((125, 85, 155, 115), fill="red")  # centred at 35 %: a window can centre it
    point = salient_point(Intermediate(inner, 1.0), (Fraction(1, 2), Fraction(1)))
    assert point is not None and abs(point[0] - Fraction(35, 100)) <= Fraction(1, 100)
    assert im.tobytes() == before and kept.region(im.size, (0, 0, W, H)).tobytes() == before
    assert salient_point(kept, (Fraction(1), Fraction(1))) is None  # nothing is cropped: nothing to choose


def test_crop_box_slides_the_window_to_the_focus_and_stops_at_the_edges() -> None:
    assert crop_box(400, 200, 100, 100) == (100, 0, 300, 200)
    assert crop_box(400, 200, 100, 100, (0, 0)) == (0, 0, 200, 200)
    assert crop_box(400, 200, 100, 100, (1, 1)) == (200, 0, 400, 200)
    assert crop_box(400, 200, 100, 100, (0.3, 0)) == (20, 0, 220, 200)
    assert crop_box(200, 400, 100, 50, (0, 1)) == (0, 300, 200, 400)


# ------------------------------------------------------------------------------------------------------ fit: pad


def pad(width: int, height: int, **fields: Any) -> Preset:
    return Preset("pad", width, height, fit="pad", **{"format": "png", **fields})


@pytest.mark.parametrize("orientation", range(1, 9))
def test_pad_is_exactly_the_box_under_every_orientation(pipeline: Pipeline, orientation: int) -> None:
    data = stored(picture(), orientation)
    rendition = render(pipeline, data, pad(101, 77, background="#0000ff"))
    out = decode(rendition.body).convert("RGB")
    assert out.size == (rendition.width, rendition.height) == (101, 77)
    # 400x200 contained in 101x77 is 101x51 (50.5 rounds up), centred: 13 rows of pad above, 13 below.
    assert out.getpixel((50, 0)) == out.getpixel((50, 12)) == out.getpixel((50, 76)) == (0, 0, 255)
    assert out.getpixel((50, 13)) != (0, 0, 255) and out.getpixel((50, 63)) != (0, 0, 255)
    assert out.getpixel((50, 64)) == (0, 0, 255)
    assert near(subject_centre(out), (60 * 101 / 400, 13 + 170 * 101 / 400), 1.5)


def test_pad_gravity_places_the_image_and_small_images_are_not_enlarged(pipeline: Pipeline) -> None:
    data = stored(picture(), 1)
    south = decode(render(pipeline, data, pad(100, 100, gravity="south", background="black")).body).convert("RGB")
    assert south.getpixel((50, 49)) == (0, 0, 0) and south.getpixel((50, 50)) == GREY
    tiny = decode(render(pipeline, data, pad(801, 401)).body).convert("RGB")
    assert tiny.size == (801, 401) and tiny.getpixel((100, 200)) == (255, 255, 255)  # the global background
    assert near(subject_centre(tiny), (200 + 60, 100 + 170), 1)  # 400x200 kept as is at offset (200, 100)
    upscaled = decode(render(pipeline, data, pad(801, 401, upscale=True)).body).convert("RGB")
    assert upscaled.getpixel((400, 0)) == GREY  # 801x401 is 2x, rounded: nothing left to pad


def test_pad_of_a_transparent_png_stays_transparent_unless_the_format_has_no_alpha(pipeline: Pipeline) -> None:
    kite = picture("RGBA", (0, 0, 0, 0))
    data = io.BytesIO()
    kite.save(data, "PNG")
    preset = pad(100, 100, background="#00ff00", format="auto")
    png = render(pipeline, data.getvalue(), preset)
    out = decode(png.body)
    assert png.format == "png" and out.mode == "RGBA" and out.size == (100, 100)
    assert out.getpixel((0, 0))[3] == 0 and out.getpixel((50, 10))[3] == 0  # padding and transparent source
    webp = decode(render(pipeline, data.getvalue(), preset, negotiated="webp").body)
    assert webp.mode == "RGBA" and webp.getpixel((0, 0))[3] == 0
    jpeg = decode(render(pipeline, data.getvalue(), preset, forced_format="jpeg").body)
    assert jpeg.mode == "RGB" and max(abs(a - b) for a, b in zip(jpeg.getpixel((3, 3)), (0, 255, 0), strict=True)) < 8


def test_pad_of_an_opaque_image_is_opaque_and_a_grey_image_takes_a_coloured_pad(pipeline: Pipeline) -> None:
    out = render(pipeline, stored(picture(), 1), dataclasses.replace(pad(100, 100), format="auto"))
    assert out.format == "jpeg"  # padding an opaque picture adds no alpha
    grey = io.BytesIO()
    Image.new("L", (200, 100), 90).save(grey, "PNG")
    padded = decode(render(pipeline, grey.getvalue(), pad(100, 100, background="red")).body)
    assert padded.mode == "RGB" and padded.getpixel((0, 0)) == (255, 0, 0) and padded.getpixel((50, 50)) == (90,) * 3


def test_animations_are_padded_and_cropped_by_gravity(pipeline: Pipeline) -> None:
    frames = [picture(), Image.new("RGB", (W, H), "blue")]
    data = io.BytesIO()
    frames[0].save(data, "GIF", save_all=True, append_images=frames[1:], duration=100)
    padded = decode(render(pipeline, data.getvalue(), pad(100, 100, format="source", background="white")).body)
    assert padded.n_frames == 2 and padded.size == (100, 100)
    cropped = render(pipeline, data.getvalue(), cover((100, 100), "west"), forced_format="gif")
    assert near(subject_centre(decode(cropped.body)), expected_centre((100, 100), POINTS["west"]))


# ------------------------------------------------------------------------------------------------ configuration


def test_config_validates_gravity_background_and_pad() -> None:
    def preset(**fields: Any) -> Preset:
        return parse_config({"origins": ["s3://b"], "presets": {"p": fields}}, {}).presets["p"]

    assert preset(width=10, height=10, fit="cover", gravity="center").gravity == "centre"
    assert preset(width=10, height=10, fit="pad", background="#123").background == "#123"
    with pytest.raises(ConfigError, match=r"presets\.p\.gravity: must be one of centre, north"):
        preset(width=10, height=10, fit="cover", gravity="top")
    with pytest.raises(ConfigError, match=r"presets\.p\.background: not a colour"):
        preset(width=10, height=10, fit="pad", background="#12")
    with pytest.raises(ConfigError, match=r"presets\.p\.fit: 'pad' needs both width and height"):
        preset(width=10, fit="pad")
    with pytest.raises(ConfigError, match=r"encoding\.background: not a colour"):
        parse_config({"origins": ["s3://b"], "presets": {"p": {"width": 1}}, "encoding": {"background": "x"}}, {})
    assert set(GRAVITIES) == {*POINTS, "smart"}


def test_new_fields_change_the_fingerprint_and_show_in_presets_json() -> None:
    from service.identity import preset_fingerprints

    base = {"origins": ["s3://b"], "presets": {"p": {"width": 10, "height": 10, "fit": "cover"}}}
    prints = {preset_fingerprints(parse_config(base, {}))["p"]}
    for change in ({"gravity": "north"}, {"gravity": "smart"}, {"background": "black"}, {"fit": "pad"}):
        raw = {**base, "presets": {"p": {**base["presets"]["p"], **change}}}
        config = parse_config(raw, {})
        prints.add(preset_fingerprints(config)["p"])
        assert {k: config.presets["p"].public()[k] for k in change} == change
    assert len(prints) == 5


# ----------------------------------------------------------------------------------------------------- end to end


def test_focus_from_s3_metadata_end_to_end_and_through_memcached(
    s3_endpoint: str, memcached_server: str, tmp_path: Path
) -> None:
    """x-amz-meta-focus moves the crop; the ETag changes with the focus on the same bytes; a second instance,
    rendering from the original cached in memcached (no S3 GET), keeps the focus; a malformed focus is ignored."""
    client = support.s3_client(s3_endpoint)
    client.create_bucket(Bucket="crops")
    data = stored(picture(), 6)
    client.put_object(Bucket="crops", Key="o/plain.jpg", Body=data)
    client.put_object(Bucket="crops", Key="o/focused.jpg", Body=data, Metadata={"focus": "0.15,0.85"})
    client.put_object(Bucket="crops", Key="o/bad.jpg", Body=data, Metadata={"focus": "here"})
    proxy = support.CountingProxy(upstream=s3_endpoint)
    origins = ["s3://crops/o"]
    config = {"presets": {"square": {"width": 100, "height": 100, "fit": "cover", "format": "png"}}}
    env = {"AWS_ENDPOINT_URL": proxy.url}
    try:
        with support.instance(tmp_path, origins, [memcached_server], config, env, name="a") as (_, url):
            plain, focused, bad = (requests.get(f"{url}/square/{key}.jpg") for key in ("plain", "focused", "bad"))
        assert plain.status_code == focused.status_code == bad.status_code == 200
        assert subject_centre(decode(plain.content)) is None  # the centre crop loses the subject
        assert near(subject_centre(decode(focused.content)), expected_centre((100, 100), (0.15, 0.85)))
        assert bad.content == plain.content
        assert focused.headers["ETag"] != plain.headers["ETag"] == bad.headers["ETag"]

        cache = MemcachedOriginals(MemcachedOptions(servers=(memcached_server,)), Limits(), origins_namespace(origins))
        deadline = time.monotonic() + 30  # the instance stores originals in the background
        while cache.head("focused.jpg") is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cache.head("focused.jpg").version == f"{Original.from_bytes(data).digest}@0.150000,0.850000"
        gets = proxy.total()
        with support.instance(tmp_path, origins, [memcached_server], config, env, name="b") as (_, url):
            again = requests.get(f"{url}/square/focused.jpg")
            revalidated = requests.get(f"{url}/square/focused.jpg", headers={"If-None-Match": again.headers["ETag"]})
        assert proxy.total() == gets  # from memcached: S3 was not asked again
        assert again.content == focused.content and again.headers["ETag"] == focused.headers["ETag"]
        assert revalidated.status_code == 304
    finally:
        proxy.close()


def test_through_nginx_focus_pad_and_smart_and_a_focus_change_needs_a_purge(s3_endpoint: str, tmp_path: Path) -> None:
    """The real stack (nginx, two instances, memcached, moto): every new preset kind serves its exact box; nginx
    caches by URL, so a changed focus shows only after ``phizer purge``'s admin call, and then with a new ETag."""
    client = support.s3_client(s3_endpoint)
    client.create_bucket(Bucket="crops-nginx")
    data = stored(picture(), 8)
    client.put_object(Bucket="crops-nginx", Key="k.jpg", Body=data, Metadata={"focus": "0.15,0.85"})
    presets = {
        "square": {"width": 100, "height": 100, "fit": "cover"},
        "smart": {"width": 100, "height": 25, "fit": "cover", "gravity": "smart"},
        "boxed": {"width": 101, "height": 77, "fit": "pad", "background": "#0000ff", "format": "png"},
    }
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"origins": ["s3://crops-nginx"], "presets": presets}))
    env = {**support.AWS_ENV, "PHIZER_CONFIG": str(config), "AWS_ENDPOINT_URL": s3_endpoint}

    def get(path: str) -> requests.Response:
        resp = requests.get(stack.url + path, headers={"Accept": "image/webp", "Connection": "close"}, timeout=30)
        assert resp.status_code == 200, (path, resp.status_code, resp.text)
        return resp

    with Stack(tmp_path / "state", port=free_port(), instances=2, env=env) as stack:
        first = get("/square/k.jpg")
        assert first.headers["X-Cache-Status"] == "MISS" and first.headers["Content-Type"] == "image/webp"
        assert near(subject_centre(decode(first.content)), expected_centre((100, 100), (0.15, 0.85)), 3)
        smart = decode(get("/smart/k.jpg").content)  # the focus wins over smart too; both keep the subject
        assert smart.size == (100, 25) and subject_centre(smart) is not None
        boxed = decode(get("/boxed/k.jpg").content).convert("RGB")
        assert boxed.size == (101, 77) and boxed.getpixel((50, 0)) == (0, 0, 255)
        client.copy_object(
            Bucket="crops-nginx",
            Key="k.jpg",
            CopySource={"Bucket": "crops-nginx", "Key": "k.jpg"},
            Metadata={"focus": "0.9,0.2"},
            MetadataDirective="REPLACE",
        )
        stale = get("/square/k.jpg")
        assert stale.headers["X-Cache-Status"] == "HIT" and stale.content == first.content  # cached by URL
        purged = requests.post(stack.url + "/_phizer/purge", json={"keys": ["k.jpg"]}, timeout=30)
        assert purged.status_code == 200 and purged.json()["purged"]["k.jpg"]["renditions"] >= 3
        fresh = get("/square/k.jpg")
        assert fresh.headers["X-Cache-Status"] == "MISS" and fresh.headers["ETag"] != first.headers["ETag"]
        assert near(subject_centre(decode(fresh.content)), expected_centre((100, 100), (0.9, 0.2)))  # lost: None
