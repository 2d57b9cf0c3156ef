"""``GET /``: the gallery, the first page a newcomer or a designer opens.

The originals of the first origin (the keys with an image extension, a page at a time), each at every preset
side by side, with each rendition's size, format and bytes (read by the page itself from the rendition it loaded)
and a link to it; above them, a table of the presets (with their lifetimes) and whether signed ad-hoc sizes are on
(their limits, never the keys). It is on in the embedded config (``make run``) and off in production
(``gallery: false``: listing the originals is nobody else's business). Plain HTML and a few lines of script, no assets.
"""

from __future__ import annotations

import html
import itertools
import urllib.parse

import falcon

from service.config import Config
from service.origins import list_keys
from service.presets import SUFFIX_FORMATS, Preset

SCRIPT = """
const imgs = [...document.querySelectorAll("img")];
let done = 0;
function finished(img) {
  const cap = img.closest("figure").querySelector(".info");  // the rest of the caption says what was asked
  img.dataset.natural = img.naturalWidth;
  // The same Accept as the browser's <img> requests, so the format shown is the one the image got.
  fetch(img.src, {method: "HEAD", headers: {Accept: "image/avif,image/webp,image/apng,image/*,*/*;q=0.8"}}).then(r => {
    cap.textContent = img.naturalWidth + "\\u00d7" + img.naturalHeight + " \\u00b7 " +
      (r.headers.get("Content-Type") || "?").replace("image/", "") + " \\u00b7 " +
      Math.round((+r.headers.get("Content-Length") || 0) / 102.4) / 10 + " KB";
  }).finally(() => { if (++done === imgs.length) document.body.dataset.loaded = String(done); });
}
// A cold page asks for many renditions at once: beyond the host's render budget some are shed with 503 and
// Retry-After, which an <img> cannot read. Retry those a few times (nginx ignores the query string).
function failed(img) {
  const tries = +(img.dataset.tries || 0);
  if (tries >= 5) { finished(img); return; }
  img.dataset.tries = tries + 1;
  setTimeout(() => { img.src = img.src.split("?")[0] + "?retry=" + (tries + 1); }, 1000);
}
imgs.forEach(img => {
  img.addEventListener("load", () => finished(img));
  img.addEventListener("error", () => failed(img));
  if (img.complete && img.naturalWidth) finished(img);
});
if (!imgs.length) document.body.dataset.loaded = "0";
"""
STYLE = """
body { font: 14px system-ui, sans-serif; margin: 1.5em; background: #fafafa; }
section { margin-bottom: 2em; } h2 { font-size: 1em; font-family: monospace; }
.row { display: flex; gap: 1em; align-items: flex-start; overflow-x: auto; }
table { border-collapse: collapse; margin-bottom: 1.5em; } td, th { padding: 2px 10px; text-align: left; }
figure { margin: 0; } figcaption { color: #555; font-size: 12px; } img { display: block; background: #eee; }
"""


def legend(config: Config) -> str:
    """Every preset's definition and lifetimes, and the state of signed ad-hoc sizes."""
    rows = "".join(
        f"<tr><td><b>{html.escape(name)}</b></td><td>{preset.width or 'auto'}\u00d7{preset.height or 'auto'}</td>"
        f"<td>{preset.fit}</td><td>{preset.format}</td><td>{preset.quality}</td>"
        f"<td>{html.escape(str(preset.cache_control))}</td><td>{preset.cache_valid} s</td></tr>"
        for name, preset in config.presets.items()
    )
    signing = config.signing
    adhoc = (
        f"on: up to {signing.max_width}\u00d7{signing.max_height}, format {signing.format}, quality "
        f"{signing.quality}, {html.escape(str(signing.cache_control))}, nginx keeps {signing.cache_valid} s"
        if signing.keys
        else "off (no signing keys)"
    )
    return (
        "<table><tr><th>preset</th><th>box</th><th>fit</th><th>format</th><th>quality</th><th>Cache-Control</th>"
        f"<th>nginx keeps</th></tr>{rows}</table><p id='adhoc'>Signed ad-hoc sizes (/_/...): {adhoc}. Originals "
        f"from a fallback origin: {html.escape(config.fallback_cache_control)}, nginx keeps "
        f"{config.fallback_cache_valid} s.</p>"
    )


def describe(preset: Preset, background: str) -> str:
    """A preset in a few words: its box and fit, where a crop or pad goes, and a pad's colour."""
    words = [f"{preset.width or 'auto'}\u00d7{preset.height or 'auto'}", preset.fit]
    if preset.fit == "cover" or (preset.fit == "pad" and preset.gravity != "centre"):
        words.append(preset.gravity)
    if preset.fit == "pad":
        words.append(f"on {preset.background or background}")
    return " ".join(words)


def format_note(preset: Preset) -> str:
    """How the preset picks its format: fixed, or "auto" with its negotiation order (the first one Accept lists)."""
    if preset.format != "auto":
        return preset.format
    if not preset.negotiate:
        return "auto: jpeg/png, never negotiated"
    return f"auto: {' > '.join(preset.negotiate)} > jpeg/png"


def page(config: Config, number: int) -> str:
    """The HTML of gallery page ``number`` (from 0): ``gallery_page_size`` originals."""
    size = config.gallery_page_size
    try:
        images = (key for key in list_keys(config, "") if key.rpartition(".")[2].lower() in SUFFIX_FORMATS)
        keys = list(itertools.islice(images, number * size, (number + 1) * size + 1))
        note = ""
    except (ValueError, OSError) as exc:  # an HTTP origin cannot be listed; an unreadable folder
        keys, note = [], f"<p>{html.escape(str(exc).split(':')[0])}: the first origin cannot be listed.</p>"
    more, keys = len(keys) > size, keys[:size]
    sections = []
    for key in keys:
        figures = []
        for name, preset in config.presets.items():
            src = html.escape(f"/{name}/{urllib.parse.quote(key)}")
            box = html.escape(f"{describe(preset, config.encoding.background)}, {format_note(preset)}")
            figures.append(
                f'<figure><a href="{src}"><img src="{src}" alt="{html.escape(key)} at {name}" '
                f'data-preset="{name}" data-width="{preset.width or ""}" data-height="{preset.height or ""}"></a>'
                f"<figcaption><b>{name}</b> ({box})<br><span class='info'>loading\u2026</span></figcaption></figure>"
            )
        sections.append(f'<section><h2>{html.escape(key)}</h2><div class="row">{"".join(figures)}</div></section>')
    nav = []
    if number > 0:
        nav.append(f'<a href="/?page={number - 1}">\u2190 previous</a>')
    if more:
        nav.append(f'<a href="/?page={number + 1}">next \u2192</a>')
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>phizer gallery</title><style>{STYLE}</style>"
        f"</head><body><h1>phizer: {len(config.presets)} presets, page {number + 1}</h1>{legend(config)}{note}"
        f"{''.join(sections) or '<p>No originals.</p>'}<nav>{' '.join(nav)}</nav>"
        f"<script>{SCRIPT}</script></body></html>"
    )


class GalleryResource:
    """``GET /`` (and HEAD); ``?page=N`` pages through the originals."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        number = req.get_param_as_int("page", min_value=0, max_value=100_000, default=0)
        resp.content_type = falcon.MEDIA_HTML
        resp.text = page(self.config, number)
        resp.set_header("Cache-Control", "no-store")

    on_head = on_get
