"""URL grammar and key checks: every client mistake is a 400/404 before any I/O."""

from __future__ import annotations

import pytest

from service.errors import BadRequest, NotFound
from service.presets import Preset, parse_path

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
