"""Colour management: pixels described by an embedded ICC profile converted to sRGB (littleCMS).

The pipeline's ``to_srgb`` step (service/pipeline.py): untagged images are sRGB on the web, so a converted image
drops its profile, and a CMYK one always ends as RGB. Building a transform costs more than applying it, so the
last few are kept, by the profile's digest.
"""

from __future__ import annotations

import hashlib
import io
from collections import OrderedDict

from PIL import Image, ImageCms

from service.offload import native_lock

SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


def _build_srgb_transform(icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
    """A littleCMS transform from an embedded profile to sRGB (littleCMS transforms are safe to apply from several
    threads at once); None for a profile that cannot convert these pixels."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space.strip()
        if (space, mode) not in (("RGB", "RGB"), ("RGB", "RGBA"), ("CMYK", "CMYK")):
            return None  # gray profiles, or a profile that does not match the pixels: leave the pixels alone
        out_mode = "RGBA" if mode == "RGBA" else "RGB"
        return ImageCms.buildTransform(profile, SRGB, mode, out_mode, ImageCms.Intent.PERCEPTUAL)
    except (ImageCms.PyCMSError, OSError, ValueError):
        return None  # a broken profile is treated as none: better slightly-off colours than no image


class TransformCache:
    """The last ``size`` sRGB transforms, by the profile's digest (building one costs more than using it).

    Keyed by digest, not by the profile's bytes: an embedded profile can be megabytes (JPEG APP2 chunks up to 16 MB,
    a WebP ICCP chunk up to the whole file), and a cache keyed by the bytes would pin every one of them for the
    process's life. Renders run on several native threads: every access holds a native lock.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[tuple[bytes, str], ImageCms.ImageCmsTransform | None] = OrderedDict()
        self._lock = native_lock()

    def get(self, icc: bytes, mode: str) -> ImageCms.ImageCmsTransform | None:
        key = (hashlib.sha256(icc).digest(), mode)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        transform = _build_srgb_transform(icc, mode)
        with self._lock:
            self._entries[key] = transform
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return transform


SRGB_TRANSFORMS = TransformCache(32)


def to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """Convert pixels described by an embedded ICC profile to sRGB; CMYK always ends as RGB."""
    transform = SRGB_TRANSFORMS.get(icc, im.mode) if icc else None
    if transform is not None:
        return ImageCms.applyTransform(im, transform)
    return im.convert("RGB") if im.mode == "CMYK" else im
