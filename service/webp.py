"""Still WebP originals decoded by libwebp directly: the same pixels as Pillow's decode, 1.3-1.7x faster.

Pillow opens every WebP through libwebp's animation decoder, even a still: it decodes into an RGBA canvas, copies
that canvas into a bytes object, then unpacks the bytes into the image (dropping the alpha of an opaque file), two
more passes over 4 bytes per pixel after the decode. ``decode_still`` does what the animation decoder does for a
still's one frame, without the canvas: libwebp's demuxer finds the frame (exactly the bytes Pillow's path
decodes: the demuxer is the one that, say, drops an ALPH chunk the VP8X header does not announce, or ends the
image at its chunk), and libwebp decodes it straight into a buffer of ours (the ``...Into`` calls): RGBA, which
Pillow then uses as the image's own memory (no copy), or for an opaque file RGB, unpacked once into Pillow's
4-byte pixels.

The pixels are the same, bit for bit: the same library (found through Pillow's own ``_webp`` extension, so the
very copy Pillow links), the same input, the same decoder defaults (fancy upsampling, no dithering), and the mode
Pillow chose. tests/test_webp.py checks the equality on the corpus and on generated files of every kind, and
that damaged files either decode exactly like Pillow's or are declined.

Anything unexpected (an animation, a frame other than Pillow's header said, a failed decode, libwebp not
loadable) gives None: the caller decodes with Pillow, which reports its own errors.

Thread safety: renders run on several native threads; ctypes releases the GIL for each call, and every call
works on its own demuxer and decodes into its own buffer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

from PIL import Image

log = logging.getLogger(__name__)

# WebPDemux is an inline wrapper in demux.h: the library exports WebPDemuxInternal, which takes the demux ABI
# version the caller was built for and refuses another major version; the structs below are that ABI's.
DEMUX_ABI_VERSION = 0x0107  # libwebp 1.x
WEBP_FF_FORMAT_FLAGS, WEBP_FF_FRAME_COUNT = 0, 5
ANIMATION_FLAG = 0x02


class WebPData(ctypes.Structure):
    _fields_ = [("bytes", ctypes.c_void_p), ("size", ctypes.c_size_t)]


class WebPIterator(ctypes.Structure):
    """libwebp's WebPIterator (demux ABI 1): one frame of a demuxed file."""

    _fields_ = [
        ("frame_num", ctypes.c_int),
        ("num_frames", ctypes.c_int),
        ("x_offset", ctypes.c_int),
        ("y_offset", ctypes.c_int),
        ("width", ctypes.c_int),
        ("height", ctypes.c_int),
        ("duration", ctypes.c_int),
        ("dispose_method", ctypes.c_int),
        ("complete", ctypes.c_int),
        ("fragment", WebPData),
        ("has_alpha", ctypes.c_int),
        ("blend_method", ctypes.c_int),
        ("pad", ctypes.c_uint32 * 2),
        ("private_", ctypes.c_void_p),
    ]


class LibWebP:
    """The libwebp functions the fast path calls, with their signatures declared (AttributeError when a library
    lacks one: not a usable libwebp)."""

    def __init__(self, decoder: ctypes.CDLL, demuxer: ctypes.CDLL) -> None:
        self.demux = demuxer.WebPDemuxInternal
        self.demux.argtypes = [ctypes.POINTER(WebPData), ctypes.c_int, ctypes.c_void_p, ctypes.c_int]
        self.demux.restype = ctypes.c_void_p
        self.demux_delete = demuxer.WebPDemuxDelete
        self.demux_delete.argtypes = [ctypes.c_void_p]
        self.demux_delete.restype = None
        self.get_i = demuxer.WebPDemuxGetI
        self.get_i.argtypes = [ctypes.c_void_p, ctypes.c_int]
        self.get_i.restype = ctypes.c_uint32
        self.get_frame = demuxer.WebPDemuxGetFrame
        self.get_frame.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(WebPIterator)]
        self.get_frame.restype = ctypes.c_int
        self.release_iterator = demuxer.WebPDemuxReleaseIterator
        self.release_iterator.argtypes = [ctypes.POINTER(WebPIterator)]
        self.release_iterator.restype = None
        # (data, data_size, output_buffer, output_buffer_size, output_stride) -> output_buffer, NULL on failure
        self.decode_into = {"RGB": decoder.WebPDecodeRGBInto, "RGBA": decoder.WebPDecodeRGBAInto}
        for func in self.decode_into.values():
            func.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            func.restype = ctypes.c_void_p
        self.version = decoder.WebPGetDecoderVersion
        self.version.argtypes = []
        self.version.restype = ctypes.c_int


def _load() -> LibWebP | None:
    """libwebp as Pillow decodes with it; None (logged once, at import) when it cannot be loaded.

    First through Pillow's ``_webp`` extension: a symbol looked up on a loaded library's handle is searched in
    its dependencies too, so this finds the libwebp and libwebpdemux Pillow is linked against, be they the
    system's or copies bundled in a wheel. Else the system's, by name.
    """
    candidates: list[tuple[str | None, str | None]] = []
    try:
        from PIL import _webp

        candidates.append((_webp.__file__, _webp.__file__))
    except ImportError:
        pass
    candidates.append((ctypes.util.find_library("webp"), ctypes.util.find_library("webpdemux")))
    for decoder, demuxer in candidates:
        if decoder is None or demuxer is None:
            continue
        try:
            return LibWebP(ctypes.CDLL(decoder), ctypes.CDLL(demuxer))
        except (OSError, AttributeError):
            continue
    log.warning("libwebp could not be loaded: still WebP originals are decoded by Pillow (slower)")
    return None


LIBWEBP = _load()


def decode_still(data: bytes, mode: str, size: tuple[int, int]) -> Image.Image | None:
    """``data``, a still WebP that Pillow opened as ``mode`` (RGB or RGBA) and ``size``, decoded by libwebp.

    None when libwebp is not loaded, the file is an animation or its frame is not what Pillow's header said, or
    the decode fails (a damaged file): the caller then decodes with Pillow.
    """
    if LIBWEBP is None or mode not in LIBWEBP.decode_into:
        return None
    source = WebPData(ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p), len(data))  # data itself, no copy
    demuxer = LIBWEBP.demux(ctypes.byref(source), 0, None, DEMUX_ABI_VERSION)
    if not demuxer:
        return None
    frame = WebPIterator()
    try:
        if (
            LIBWEBP.get_i(demuxer, WEBP_FF_FORMAT_FLAGS) & ANIMATION_FLAG
            or LIBWEBP.get_i(demuxer, WEBP_FF_FRAME_COUNT) != 1
            or not LIBWEBP.get_frame(demuxer, 1, ctypes.byref(frame))
        ):
            return None
        try:
            if not frame.complete or (frame.x_offset, frame.y_offset, frame.width, frame.height) != (0, 0, *size):
                return None
            width, height = size
            buffer = bytearray(width * height * len(mode))
            target = (ctypes.c_char * len(buffer)).from_buffer(buffer)
            decode = LIBWEBP.decode_into[mode]
            if not decode(frame.fragment.bytes, frame.fragment.size, target, len(buffer), width * len(mode)):
                return None
        finally:
            LIBWEBP.release_iterator(ctypes.byref(frame))
    finally:
        LIBWEBP.demux_delete(demuxer)
    if mode == "RGBA":
        return Image.frombuffer("RGBA", size, buffer, "raw", "RGBA", 0, 1)  # the buffer becomes the image's memory
    return Image.frombytes("RGB", size, buffer)  # Pillow keeps RGB as 4 bytes a pixel: one unpack
