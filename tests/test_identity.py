"""A rendition's identity (service/identity.py) covers the AVIF encoder: its settings, the plugin and its libraries."""

from __future__ import annotations

import pillow_avif
import pytest

from service import formats
from service.config import parse_config
from service.identity import library_versions, preset_fingerprints

BASE = {"origins": ["file:///srv/img"], "presets": {"small": {"width": 320}, "thumb": {"width": 150}}}


def test_library_versions_name_the_avif_plugin_libavif_and_its_encoders() -> None:
    versions = library_versions()
    assert versions["pillow_avif"] == pillow_avif.__version__
    assert versions["libavif"] and versions["libavif"][0].isdigit()
    assert "aom" in (versions["av1"] or "")  # the AV1 encoder libavif picks by default


def test_avif_settings_change_the_fingerprints() -> None:
    base = preset_fingerprints(parse_config(BASE, {}))
    slower = preset_fingerprints(parse_config({**BASE, "encoding": {"avif_speed": 6}}, {}))
    assert all(base[name] != slower[name] for name in base)  # a shared encoder setting: every preset
    own_order = {**BASE["presets"], "small": {"width": 320, "negotiate": ["webp"]}}
    ordered = preset_fingerprints(parse_config({**BASE, "presets": own_order}, {}))
    assert ordered["small"] != base["small"] and ordered["thumb"] == base["thumb"]
    avif_quality = {**BASE["presets"], "thumb": {"width": 150, "quality_by_format": {"avif": 40}}}
    assert preset_fingerprints(parse_config({**BASE, "presets": avif_quality}, {}))["thumb"] != base["thumb"]


def test_a_plugin_upgrade_changes_the_fingerprints(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(BASE, {})
    before = preset_fingerprints(config)
    monkeypatch.setattr(pillow_avif, "__version__", "99.0.0")
    library_versions.cache_clear()  # read once per process: the libraries cannot change under a running instance
    try:
        assert preset_fingerprints(config)["small"] != before["small"]
    finally:
        library_versions.cache_clear()


def test_a_recalibrated_avif_mapping_changes_the_fingerprints(monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(BASE, {})
    before = preset_fingerprints(config)
    monkeypatch.setattr(formats, "AVIF_QUALITY", ((0, 0), (100, 100)))  # 82 would map to 82 now
    assert preset_fingerprints(config)["small"] != before["small"]
