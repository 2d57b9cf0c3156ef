"""Signatures of ad-hoc sizes: HMAC-SHA256 over the signed part of the URL, so only the site can ask for a size.

As small as pilbox's: ``derive`` the signature of a message with one key, ``sign`` with the first key, ``verify``
against every key (rotation: add the new key first, re-sign, drop the old one once no page uses it). The whole MAC,
URL-safe base64 without padding: 43 characters. Verification compares in constant time (``hmac.compare_digest``),
so a forger learns nothing from how long a wrong guess took.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

SIGNATURE_CHARS = 43  # base64 of 32 bytes, padding dropped


def derive(key: str, message: str) -> str:
    """The signature of ``message`` (the URL path after ``/_/<signature>/``, percent-decoded) with one key."""
    mac = hmac.new(key.encode(), message.encode("utf-8", "surrogatepass"), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode("ascii")


def sign(keys: Sequence[str], message: str) -> str:
    """The signature with the first (current) key."""
    return derive(keys[0], message)


def verify(keys: Sequence[str], message: str, signature: str) -> bool:
    """Whether ``signature`` is ``message``'s under any of ``keys``; anything malformed is simply not."""
    given = signature.encode("utf-8", "surrogatepass")
    if len(given) != SIGNATURE_CHARS:
        return False
    return any(hmac.compare_digest(derive(key, message).encode("ascii"), given) for key in keys)
