"""Property tests of the URL rules and the file origin (issue 10): for any path whatsoever, ``parse_path`` answers
with a request whose key is safe to hand to an origin, or with phizer's own 400/404 (never a 500); and no key it
accepts ever reads a file outside a FileOrigin's folder.

The paths are built from what breaks URL parsers: ``/``, ``.`` and ``..`` segments, empty segments, control
characters, ``%`` (parse_path gets paths already percent-decoded: a literal ``%2e%2e`` is just a name), any
Unicode including lone surrogates, keys of thousands of bytes, and format suffixes spelt with the non-ASCII
letters that Python's case-insensitive ``re`` takes for ASCII ones. Derandomized and without an example database,
so every run tries the same paths.
"""

from __future__ import annotations

import re
import string
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import event, example, given, settings
from hypothesis import strategies as st

from service.config import Limits
from service.errors import BadRequest, NotFound
from service.origins import FileOrigin, OriginFailure
from service.presets import SUFFIX_FORMATS, ImageRequest, check_key, parse_path
from tests.imaging import DEFAULT_CONFIG

PROPERTY_SETTINGS = settings(max_examples=1000, deadline=timedelta(seconds=1), derandomize=True, database=None)
PRESETS = DEFAULT_CONFIG.presets
MAX_KEY_BYTES = DEFAULT_CONFIG.limits.max_key_bytes
# The control characters the README's 400 row and check_key mean: C0 and DEL.
CONTROL = {chr(cp) for cp in (*range(0x20), 0x7F)}
# Non-ASCII characters that Python's re, case-insensitively, matches to an ASCII letter (İ, ı, ſ, K): found by
# asking re itself, so a suffix written with them is tried whatever the Unicode tables of this Python say.
_ASCII_LETTER = re.compile("[a-z]", re.IGNORECASE)
_LOOKALIKES = [chr(cp) for cp in range(0x80, 0x10000) if _ASCII_LETTER.fullmatch(chr(cp))]
_FOLDS = {
    letter: [ch for ch in _LOOKALIKES if re.fullmatch(letter, ch, re.IGNORECASE)] for letter in string.ascii_lowercase
}

# --------------------------------------------------------------------------------------------------- strategies

specials = st.sampled_from(
    ["/", "//", ".", "..", "%", "%2e%2e", "%2F", "\\", "\x00", "\n", "\t", "\x7f", "\x85", "\u2028", " ", "é", "😀"]
)
# Any code point, lone surrogates included (check_key measures keys with "surrogatepass").
any_char = st.characters() | st.characters(categories=["Cs"])


def strings(pieces: st.SearchStrategy[str], min_size: int = 0, max_size: int = 12) -> st.SearchStrategy[str]:
    """Strings joined from ``pieces`` (single characters or the multi-character specials)."""
    return st.lists(pieces, min_size=min_size, max_size=max_size).map("".join)


def extensions(folds: bool) -> st.SearchStrategy[str]:
    """Format suffixes, each letter as is or upper-cased, and with ``folds`` also as a non-ASCII letter re folds
    to it."""
    spell = {ch: [ch, ch.upper(), *(_FOLDS[ch] if folds else [])] for ch in string.ascii_lowercase}
    return st.sampled_from(sorted(SUFFIX_FORMATS)).flatmap(
        lambda ext: st.tuples(*(st.sampled_from(spell[ch]) for ch in ext)).map("".join)
    )


def keys(
    pieces: st.SearchStrategy[str], names: st.SearchStrategy[str], ext: st.SearchStrategy[str]
) -> st.SearchStrategy[str]:
    """Keys of one to six segments (the special ones, ``names``, strings of ``pieces``, image file names, names
    repeated to hundreds of bytes), ending in up to two extensions (an image's own, then a format suffix)."""
    segment = st.one_of(
        st.sampled_from(["", ".", "..", "...", " ", "%2e"]),
        names,
        strings(pieces),
        st.builds(lambda stem, e: f"{stem}.{e}", names | strings(pieces), ext),
        st.builds(
            lambda unit, count: unit * count, names | strings(pieces, min_size=1, max_size=3), st.integers(50, 700)
        ),
    )
    joined = st.lists(segment, min_size=1, max_size=6).map("/".join)
    suffixes = st.lists(ext.map(lambda e: "." + e), max_size=2).map("".join)  # photo, photo.jpg, photo.jpg.webp
    return st.builds(lambda key, suffix: key + suffix, joined, suffixes)


words = st.sampled_from(["a", "photo", "b.jpg", "IMG_0001.JPG", "x.webp"])
any_keys = keys(any_char | specials, words, extensions(folds=True))
# Structured paths, and anything at all after a preset's name (or none): unknown presets come with the latter.
paths = st.one_of(
    st.builds(
        lambda lead, name, key: f"{lead}{name}/{key}",
        st.sampled_from(["/", "", "//"]),
        st.sampled_from(sorted(PRESETS)),
        any_keys,
    ),
    st.builds(
        lambda head, rest: head + rest,
        st.sampled_from(["", "/", *(f"/{name}" for name in sorted(PRESETS))]),
        strings(any_char | specials, max_size=40),
    ),
)


# ------------------------------------------------------------------------------------------------------ helpers


def assert_safe(key: str, max_bytes: int) -> None:
    """What every origin relies on: a relative path of real names, no control characters, bounded in bytes."""
    assert key and not key.startswith("/"), key
    parts = key.split("/")
    assert "" not in parts and "." not in parts and ".." not in parts, key
    assert not CONTROL.intersection(key), key
    assert len(key.encode("utf-8", "surrogatepass")) <= max_bytes, key


def accepted(path: str, max_bytes: int = MAX_KEY_BYTES, format_suffix: bool = True) -> ImageRequest | None:
    """``parse_path``'s answer, or None for phizer's own 400/404; anything else raised would be a 500."""
    try:
        return parse_path(path, PRESETS, max_bytes, format_suffix)
    except (BadRequest, NotFound) as exc:
        assert 400 <= exc.status < 500 and exc.reason
        event(type(exc).__name__)
        return None


# -------------------------------------------------------------------------------------------------------- tests


@PROPERTY_SETTINGS
@given(path=paths, max_bytes=st.just(MAX_KEY_BYTES) | st.integers(1, 64), format_suffix=st.booleans())
@example(path="/thumb/a.jpg.gıf", max_bytes=MAX_KEY_BYTES, format_suffix=True)
def test_parse_path_gives_a_safe_key_or_a_client_error(path: str, max_bytes: int, format_suffix: bool) -> None:
    request = accepted(path, max_bytes, format_suffix)
    if request is None:
        return
    event("accepted, suffix" if request.format else "accepted")
    assert request.preset is PRESETS[path.lstrip("/").partition("/")[0]]
    assert request.format is None or (format_suffix and request.format in SUFFIX_FORMATS.values())
    assert_safe(request.key, max_bytes)


@PROPERTY_SETTINGS
@given(key=any_keys | strings(any_char | specials, max_size=40), max_bytes=st.just(MAX_KEY_BYTES) | st.integers(1, 64))
def test_check_key_passes_a_key_unchanged_or_refuses_it(key: str, max_bytes: int) -> None:
    try:
        checked = check_key(key, max_bytes)
    except BadRequest as exc:
        assert exc.status == 400 and exc.reason
        event("refused")
        return
    event("passed")
    assert checked == key
    assert_safe(checked, max_bytes)


SECRET = b"SECRET: outside the origin's folder"
INSIDE = {"a/b.jpg": b"inside a/b.jpg", "c.jpg": b"inside c.jpg"}
ORIGIN_NAMES = ["a", "b.jpg", "c.jpg", "out", "link.jpg", "secret.jpg", "up", "root", "outside"]
# Keys made of the names in the fixture's folders (files, symlinks out and back in), or of those, dot segments,
# names hundreds of bytes long and anything else but lone surrogates (Falcon decodes paths with errors="replace":
# a key reaching an origin never holds one). Format suffixes in ASCII only: their spelling is test_parse_path's
# business, not the folder's.
origin_segment = st.one_of(
    st.sampled_from(ORIGIN_NAMES),
    st.sampled_from(["", ".", ".."]),
    strings(st.characters() | specials),
    st.builds(lambda unit, count: unit * count, st.sampled_from(["a", "é", "😀"]), st.integers(50, 300)),
)
origin_paths = st.builds(
    lambda key, suffix: f"/thumb/{key}{suffix}",
    st.one_of(
        st.lists(st.sampled_from(ORIGIN_NAMES), min_size=1, max_size=4),
        st.lists(origin_segment, min_size=1, max_size=5),
    ).map("/".join),
    st.just("") | extensions(folds=False).map(lambda e: "." + e),
)


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> FileOrigin:
    """root/ holds the originals; outside/secret.jpg is next to it; symlinks lead out of root (a file, a folder)
    and back into it."""
    base = tmp_path_factory.mktemp("file-origin")
    (base / "outside").mkdir()
    (base / "outside" / "secret.jpg").write_bytes(SECRET)
    root = base / "root"
    for key, content in INSIDE.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(content)
    (root / "link.jpg").symlink_to(base / "outside" / "secret.jpg")
    (root / "out").symlink_to(Path("..") / "outside")
    (root / "a" / "up").symlink_to(Path(".."))  # back to root: inside, allowed
    return FileOrigin(f"file://{root}", Limits())


@PROPERTY_SETTINGS
@given(path=origin_paths)
@example(path="/thumb/link.jpg").via("a symlink out of the folder")
@example(path="/thumb/out/secret.jpg").via("through a symlinked folder")
@example(path="/thumb/a/up/c.jpg").via("a symlink that stays inside")
def test_file_origin_never_reads_outside_its_folder(origin: FileOrigin, path: str) -> None:
    request = accepted(path)
    if request is None:
        return
    try:
        original = origin.fetch(request.key)
    except OriginFailure:  # nothing read (whether it should be a failure: the next test)
        event("origin failure")
        return
    leads_out = not (origin.root / request.key).resolve().is_relative_to(origin.root)
    event("key leads out of the folder" if leads_out else "found" if original is not None else "missing")
    assert original is None or original.data in INSIDE.values(), (request.key, original)


@PROPERTY_SETTINGS
@given(path=origin_paths)
@example(path="/thumb/" + "a" * 256).via("one segment over NAME_MAX (255 bytes)")
def test_file_origin_answers_found_or_missing_for_every_accepted_key(origin: FileOrigin, path: str) -> None:
    """A key parse_path accepts is in the folder or not: an OriginFailure would answer 502 ("the key may exist
    there", never cached as missing) for a request that no healthy folder can satisfy."""
    request = accepted(path)
    if request is not None:
        original = origin.fetch(request.key)
        assert original is None or original.data in INSIDE.values()
