"""URL grammar and key checks: every client mistake is a 400/404 before any I/O."""

from __future__ import annotations

import pytest

from service.errors import BadRequest, NotFound
from service.formats import avif_quality
from service.presets import Preset, format_token, negotiates, parse_path

PRESETS = {"small": Preset(name="small", width=320)}


def parse(path: str, suffix: bool = True):
    return parse_path(path, PRESETS, 1024, suffix)


def test_key_may_contain_slashes() -> None:
    request = parse("/small/2024/05/cat photo.jpg")
    assert request.preset.name == "small" and request.key == "2024/05/cat photo.jpg" and request.format is None


def test_format_suffix_only_after_a_key_with_its_own_extension() -> None:
    assert (parse("/small/a/cat.jpg.webp").key, parse("/small/a/cat.jpg.webp").format) == ("a/cat.jpg", "webp")
    assert (parse("/small/a/cat.webp").key, parse("/small/a/cat.webp").format) == ("a/cat.webp", None)
    assert parse("/small/a.b/cat.png").format is None  # the dot in a folder name does not count
    assert parse("/small/storm_2.5mp.jpg").key == "storm_2.5mp.jpg"  # a dot in the name is not an extension
    assert parse("/small/x.PNG.JPG").format == "jpeg"
    assert parse("/small/cat.jpg.webp", suffix=False).key == "cat.jpg.webp"


def test_unknown_preset_is_404() -> None:
    with pytest.raises(NotFound, match="unknown preset"):
        parse("/huge/cat.jpg")


@pytest.mark.parametrize(
    "path",
    ["/small/", "/small", "/small/../etc/passwd", "/small/a/./b.jpg", "/small/a//b.jpg", "/small/a\x00b",
     "/small/a\nb", "/small/a\x7fb", "/small/" + "x" * 1025],
)
def test_bad_keys_are_400(path: str) -> None:
    with pytest.raises(BadRequest):
        parse(path)


def test_key_length_counts_bytes_not_characters() -> None:
    parse("/small/" + "é" * 512)
    with pytest.raises(BadRequest, match="longer than 1024 bytes"):
        parse("/small/" + "é" * 513)


CHROME = "image/avif,image/webp,image/apng,image/svg+xml,image/*,*/*;q=0.8"
SAFARI = "image/webp,image/avif,image/jxl,image/heic,image/heic-sequence,video/*;q=0.8,image/png,*/*;q=0.5"


@pytest.mark.parametrize(
    ("negotiate", "accept", "token"),
    [
        (("avif", "webp"), CHROME, "avif"),
        (("avif", "webp"), SAFARI, "avif"),  # the server's order decides, not the header's
        (("avif", "webp"), "image/webp,*/*", "webp"),
        (("avif", "webp"), "*/*", ""),
        (("avif", "webp"), None, ""),
        (("webp",), CHROME, "webp"),  # AVIF turned off
        (("webp", "avif"), CHROME, "webp"),
        (("webp", "avif"), "image/AVIF", "avif"),
        ((), CHROME, ""),  # never negotiates
    ],
)
def test_format_token_follows_the_presets_order(negotiate: tuple[str, ...], accept: str | None, token: str) -> None:
    presets = {"small": Preset(name="small", width=320, negotiate=negotiate)}
    request = parse_path("/small/cat.jpg", presets, 1024)
    assert format_token(request, accept) == token
    assert negotiates(request) == bool(negotiate)


def test_avif_suffix_forces_avif_and_negotiates_nothing() -> None:
    request = parse("/small/cat.jpg.avif")
    assert (request.key, request.format) == ("cat.jpg", "avif")
    assert not negotiates(request) and format_token(request, CHROME) == ""


def test_avif_quality_maps_the_presets_jpeg_scale_unless_overridden() -> None:
    assert Preset("p", 10, quality=82).quality_for("avif") == avif_quality(82) < 82
    assert Preset("p", 10, quality=82).quality_for("webp") == 82
    assert Preset("p", 10, quality=82, quality_by_format={"avif": 50}).quality_for("avif") == 50
    mapped = [avif_quality(q) for q in range(1, 101)]
    assert mapped == sorted(mapped) and mapped[0] >= 1 and mapped[-1] == 100  # monotonic, never 0
