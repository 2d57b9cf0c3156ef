"""The errors a request can end in, each carrying its HTTP status and a one-line reason.

Every module raises these (never bare exceptions for a client's mistake), and the app turns them into a
plain-text response in one place, so the status a client sees for a given failure is decided here.

The public ``reason`` names the problem and nothing internal: no bucket, origin URL, file path, exception text or
library message. Those go in ``detail``, which only the log sees.
"""

from __future__ import annotations


class PhizerError(Exception):
    """A request failure with the HTTP status it maps to and a one-line, client-safe reason."""

    status: int = 500

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason.replace("\n", " ").strip()
        self.detail = detail  # for the log only


class BadRequest(PhizerError):
    """The URL itself is malformed (bad key, bad format suffix)."""

    status = 400


class Forbidden(PhizerError):
    """A signed ad-hoc URL whose signature is missing or wrong."""

    status = 403


class NotFound(PhizerError):
    """Unknown preset, or the original exists in no origin."""

    status = 404


class TooLarge(PhizerError):
    """The original exceeds a configured limit (bytes, pixels, frames)."""

    status = 413


class UnsupportedMedia(PhizerError):
    """The original is not an image, or in a format phizer does not decode."""

    status = 415


class Unprocessable(PhizerError):
    """The original claims to be an image but is corrupt or truncated."""

    status = 422


class Overloaded(PhizerError):
    """Every render slot of the host is busy and the request cannot wait longer (sent with Retry-After)."""

    status = 503

    def __init__(self, reason: str, retry_after: int = 1) -> None:
        super().__init__(reason)
        self.retry_after = retry_after


class BadGateway(PhizerError):
    """Every origin that could have the original failed with an error."""

    status = 502


class GatewayTimeout(PhizerError):
    """Every origin that could have the original timed out."""

    status = 504
