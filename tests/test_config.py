"""The config schema: defaults load, overrides apply, and every mistake names its key."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.config import ConfigError, load_config, parse_config

BASE = {"origins": ["file:///srv/img"], "presets": {"small": {"width": 320}}}


def test_bundled_default_loads_with_useful_presets() -> None:
    config = load_config(environ={})
    assert set(config.presets) >= {"thumb", "small", "medium", "large"}
    thumb = config.presets["thumb"]
    assert (thumb.width, thumb.height, thumb.fit) == (150, 150, "cover")
    assert config.origins[0].startswith("file:///") and config.origins[0].endswith("/samples")
    assert config.limits.max_pixels == 50_000_000
    assert config.memcached.servers == ()


def test_environment_overrides_origins_and_memcached() -> None:
    env = {"PHIZER_ORIGINS": "s3://bucket/pre, http://upload:8000/files", "PHIZER_MEMCACHED": "10.0.0.1:11211,b:1"}
    config = parse_config(BASE, env)
    assert config.origins == ("s3://bucket/pre", "http://upload:8000/files")
    assert config.memcached.servers == ("10.0.0.1:11211", "b:1")


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "origins: [file:///x]\npresets: {tiny: {width: 10, height: 10, fit: cover}}\nlimits: {max_pixels: 5}\n"
    )
    config = load_config(environ={"PHIZER_CONFIG": str(path)})
    assert list(config.presets) == ["tiny"] and config.limits.max_pixels == 5


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"limits": {"max_pixel": 1}}, "limits.max_pixel: unknown key"),
        ({"limits": {"max_pixels": "many"}}, "limits.max_pixels: expected int"),
        ({"limits": {"origin_read_timeout": -1}}, "limits.origin_read_timeout: must not be negative"),
        ({"presets": {"small": {"width": 0}}}, "presets.small.width"),
        ({"presets": {"small": {"fit": "stretch", "width": 3}}}, "presets.small.fit: must be one of"),
        ({"presets": {"small": {"width": 3, "fit": "cover"}}}, "presets.small.fit: 'cover' needs both"),
        ({"presets": {"small": {"quality": 80}}}, "presets.small: needs a width, a height or both"),
        ({"presets": {"small": {"width": 3, "format": "bmp"}}}, "presets.small.format"),
        ({"presets": {"bad name": {"width": 3}}}, "presets.bad name: preset names"),
        ({"origins": ["ftp://x"]}, "origins[0]"),
        ({"memcached": {"servers": ["nohost"]}}, "memcached.servers[0]"),
        ({"colour": "red"}, "colour: unknown key"),
        ({"encoding": {"negotiate": ["jxl"]}}, "encoding.negotiate: 'jxl' cannot be negotiated"),
        ({"encoding": {"negotiate": "avif"}}, "encoding.negotiate: expected list"),
        ({"encoding": {"avif_speed": 11}}, "encoding.avif_speed: must be from 0 to 10"),
        ({"encoding": {"png_compress_level": 10}}, "encoding.png_compress_level: must be from 0 to 9"),
        ({"presets": {"small": {"width": 3, "negotiate": ["webp", "webp"]}}}, "presets.small.negotiate: a format is"),
        ({"gallery_page_size": 0}, "gallery_page_size: must be at least 1"),
        ({"limits": {"readiness_timeout": 0}}, "limits.readiness_timeout: must be more than 0"),
    ],
)
def test_mistakes_name_the_key(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config({**BASE, **change}, {})


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml", environ={})


def test_negotiation_order_global_and_per_preset() -> None:
    """Presets take config's encoding.negotiate unless they give their own ([] = never negotiate)."""
    assert parse_config(BASE, {}).presets["small"].negotiate == ("avif", "webp")
    presets = {"small": {"width": 3}, "plain": {"width": 3, "negotiate": []}, "w": {"width": 3, "negotiate": ["webp"]}}
    config = parse_config({**BASE, "presets": presets, "encoding": {"negotiate": ["webp", "avif"]}}, {})
    assert [p.negotiate for p in config.presets.values()] == [("webp", "avif"), (), ("webp",)]
