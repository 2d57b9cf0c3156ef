"""Signed ad-hoc sizes without servers: the signature module, the ad-hoc URL rule and their config."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from service.config import ConfigError, parse_config
from service.errors import BadRequest, Forbidden, NotFound
from service.presets import Preset, Signing, parse_path
from service.signature import SIGNATURE_CHARS, derive, sign, verify

NEW, OLD = "new-key-0123456789abcdef", "old-key-0123456789abcdef"
MESSAGE = "640x480/cover/north/photos/cat.jpg"
PRESETS = {"small": Preset(name="small", width=320)}
SIGNING = Signing(keys=(NEW, OLD), max_width=2000, max_height=1000, quality=70, format="webp")


def test_signature_is_the_whole_hmac_sha256_in_url_safe_base64_without_padding() -> None:
    mac = hmac.new(NEW.encode(), MESSAGE.encode(), hashlib.sha256).digest()
    assert derive(NEW, MESSAGE) == base64.urlsafe_b64encode(mac).decode().rstrip("=")
    assert len(derive(NEW, MESSAGE)) == SIGNATURE_CHARS == 43


def test_rotation_signs_with_the_first_key_and_verifies_with_any() -> None:
    assert sign([NEW, OLD], MESSAGE) == derive(NEW, MESSAGE)
    assert verify([NEW, OLD], MESSAGE, derive(OLD, MESSAGE))  # pages signed before the rotation keep working
    assert not verify([NEW], MESSAGE, derive(OLD, MESSAGE))  # until the old key is dropped
    assert not verify([], MESSAGE, derive(NEW, MESSAGE))


@pytest.mark.parametrize(
    "tampered",
    ["641x480/cover/north/photos/cat.jpg", "640x481/cover/north/photos/cat.jpg", "640x480/contain/north/photos/cat.jpg",
     "640x480/cover/south/photos/cat.jpg", "640x480/cover/north/photos/dog.jpg", "640x480/cover/photos/cat.jpg",
     "640x480/cover/north/photos/cat.jpg/", "640x480/cover/north/photos/cat.JPG"],
)  # fmt: skip
def test_tampering_with_any_part_breaks_the_signature(tampered: str) -> None:
    assert not verify([NEW, OLD], tampered, sign([NEW], MESSAGE))


@pytest.mark.parametrize(
    "signature",
    ["", "x", derive(NEW, MESSAGE)[:-1], derive(NEW, MESSAGE) + "A", derive(NEW, MESSAGE) + "=",
     "!" * SIGNATURE_CHARS, "é" * SIGNATURE_CHARS, "\udcff" * SIGNATURE_CHARS, derive(NEW, MESSAGE).swapcase()],
)  # fmt: skip
def test_wrong_length_or_not_base64_is_simply_not_valid(signature: str) -> None:
    assert not verify([NEW, OLD], MESSAGE, signature)


def signed(rest: str, key: str = NEW) -> str:
    return f"/_/{derive(key, rest)}/{rest}"


def parse(path: str, signing: Signing | None = SIGNING):
    return parse_path(path, PRESETS, 1024, True, signing)


def test_adhoc_paths_give_a_preset_from_the_url_and_the_signing_defaults() -> None:
    request = parse(signed("640x480/cover/north/photos/cat.jpg.webp"))
    assert request.key == "photos/cat.jpg.webp" and request.format is None  # no format suffix in ad-hoc paths
    preset = request.preset
    assert (preset.name, preset.width, preset.height, preset.fit, preset.gravity) == ("_", 640, 480, "cover", "north")
    assert (preset.quality, preset.format) == (70, "webp")
    free = parse(signed("x300/cat.jpg", OLD)).preset  # an old key still verifies; the width follows the height
    assert (free.width, free.height, free.fit, free.gravity) == (None, 300, "contain", "centre")
    # A key whose first segment is a fit token: that token is read as the fit, so the URL names it explicitly.
    assert parse(signed("640x480/contain/cover/a.jpg")).key == "cover/a.jpg"
    assert parse(signed("640x480/cover")).key == "cover"


@pytest.mark.parametrize(
    "path",
    ["/_/100x100/cat.jpg", "/_//100x100/cat.jpg", "/_/" + "A" * 43 + "/100x100/cat.jpg",
     signed("100x100/cat.jpg").replace("100x100", "100x101"), signed("100x100/cat.jpg", "another-key-0123456789")],
)  # fmt: skip
def test_missing_or_bad_signatures_are_403(path: str) -> None:
    with pytest.raises(Forbidden, match="bad or missing signature"):
        parse(path)


@pytest.mark.parametrize(
    ("rest", "message"),
    [("2001x10/cat.jpg", "ad-hoc width must be from 1 to 2000"), ("10x1001/cat.jpg", "height must be from 1 to 1000"),
     ("0x10/cat.jpg", "width must be from 1"), ("x/cat.jpg", "needs a width, a height or both"),
     ("10x/cover/cat.jpg", "'cover' needs both"), ("10by10/cat.jpg", "expected /_/<signature>/<W>x<H>"),
     ("10x10/cat/../../etc/passwd", "'.' or '..' segments"), ("9" * 5000 + "x10/cat.jpg", "expected /_/")],
)  # fmt: skip
def test_signed_but_bad_sizes_and_keys_are_400(rest: str, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse(signed(rest))


def test_without_keys_the_prefix_is_no_preset() -> None:
    for signing in (None, Signing()):
        with pytest.raises(NotFound, match="unknown preset '_'"):
            parse(signed("100x100/cat.jpg"), signing)


BASE = {"origins": ["file:///srv/img"], "presets": {"small": {"width": 320}}}


def test_signing_config_keys_from_file_or_environment() -> None:
    assert not parse_config(BASE, {}).signing.keys
    config = parse_config({**BASE, "signing": {"keys": [NEW], "max_width": 800, "format": "jpeg"}}, {})
    assert config.signing.keys == (NEW,) and config.signing.max_width == 800 and config.signing.format == "jpeg"
    # The ad-hoc sizes' lifetimes are the config's unless given.
    assert (config.signing.cache_control, config.signing.cache_valid) == (config.cache_control, config.cache_valid)
    env = parse_config({**BASE, "signing": {"keys": [NEW]}}, {"PHIZER_SIGNING_KEYS": f" {OLD} , {NEW} "})
    assert env.signing.keys == (OLD, NEW)
    assert NEW not in repr(config) and NEW not in str(config.signing.public())


@pytest.mark.parametrize(
    ("signing", "environ", "message"),
    [({"keys": ["short"]}, {}, r"signing.keys\[0\]: expected a string of at least 16"),
     ({"keys": [NEW, 12345678901234567890]}, {}, r"signing.keys\[1\]"),
     ({"keys": NEW}, {}, "signing.keys: expected a list of keys"),
     ({}, {"PHIZER_SIGNING_KEYS": f"{NEW},tiny-secret"}, r"PHIZER_SIGNING_KEYS\[1\]"),
     ({"max_width": 0}, {}, "signing.max_width"), ({"quality": 101}, {}, "signing.quality"),
     ({"format": "bmp"}, {}, "signing.format"), ({"key": [NEW]}, {}, "signing.key: unknown key"),
     ({"cache_valid": "1w"}, {}, "signing.cache_valid")],
)  # fmt: skip
def test_signing_mistakes_name_the_key_never_its_value(signing: dict, environ: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        parse_config({**BASE, "signing": signing}, environ)
    assert "signing" in str(caught.value) or "PHIZER_SIGNING_KEYS" in str(caught.value)
    for secret in ("short", NEW, "tiny-secret", "12345678901234567890"):
        assert secret not in str(caught.value)


def test_a_signing_section_that_is_a_bare_string_is_not_echoed() -> None:
    with pytest.raises(ConfigError, match="signing: expected a mapping") as caught:
        parse_config({**BASE, "signing": NEW}, {})
    assert NEW not in str(caught.value)


def test_preset_named_like_the_adhoc_prefix_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"presets\._: '_' is reserved"):
        parse_config({**BASE, "presets": {"_": {"width": 3}}}, {})


def test_lifetimes_per_preset_with_config_defaults() -> None:
    config = parse_config(
        {
            **BASE,
            "presets": {"small": {"width": 320}, "avatar": {"width": 64, "cache_control": "public, max-age=600",
                                                            "cache_valid": "10m"}},
            "cache_valid": "2d",
            "fallback_cache_valid": 30,
        },
        {},
    )  # fmt: skip
    small, avatar = config.presets["small"], config.presets["avatar"]
    assert (small.cache_control, small.cache_valid) == ("public, max-age=31536000", 2 * 86400)
    assert (avatar.cache_control, avatar.cache_valid) == ("public, max-age=600", 600)
    assert (config.fallback_cache_control, config.fallback_cache_valid) == ("public, max-age=60", 30)
    mistakes = [
        ({"cache_valid": "soon"}, "cache_valid: expected seconds"),
        ({"presets": {"s": {"width": 1, "cache_valid": -1}}}, "presets.s.cache_valid"),
        ({"presets": {"s": {"width": 1, "cache_control": "a\nb"}}}, "presets.s.cache_control"),
        ({"fallback_cache_control": 60}, "fallback_cache_control: expected a header value"),
    ]
    for bad, message in mistakes:
        with pytest.raises(ConfigError, match=message):
            parse_config({**BASE, **bad}, {})
