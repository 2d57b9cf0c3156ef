"""Rendering nginx/nginx.conf.j2, the one nginx configuration, from Python (launcher, tests) and for Ansible.

nginx must apply the app's URL rules (which part of the path is the key, which format token a request gets)
and key its cache on the renditions' identity. Those come from the Python definitions (service/presets.py,
service/identity.py) as template variables, built by ``config_vars``: the rules are never written twice.
The launcher renders the template here; Ansible renders the same file with its template module, taking the same
variables from ``python -m service.nginx_conf --config FILE`` run on the host (JSON on stdout), so a variable or
filter that works here works there.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from typing import Any

import jinja2

from service.config import REPO_ROOT, Config, load_config
from service.identity import CACHE_KEY, CACHE_LEVELS, adhoc_fingerprint, preset_fingerprints
from service.presets import ADHOC, ADHOC_PATTERN, NEGOTIABLE, SUFFIX_PATTERN, negotiation_rules, order_label

TEMPLATE = REPO_ROOT / "nginx" / "nginx.conf.j2"
UPSTREAM_MARGIN = 5  # seconds nginx waits for an instance beyond the app's request_timeout


def config_vars(config: Config) -> dict[str, Any]:
    """The template variables that follow from phizer's config: presets, URL rules and cache fingerprints."""
    negotiating = {name: order_label(preset) for name, preset in config.presets.items() if order_label(preset)}
    adhoc = config.signing.preset() if config.signing.keys else None
    orders = {order_label(p): p.negotiate for p in [*config.presets.values(), *([adhoc] if adhoc else [])]}
    return {
        "presets": list(config.presets),
        "fingerprints": preset_fingerprints(config),
        "cache_key": CACHE_KEY.format(uri="$uri", token="$phizer_format", fingerprint="$phizer_fingerprint"),
        "cache_levels": ":".join(str(width) for width in CACHE_LEVELS),
        "negotiating": negotiating,
        "suffix_pattern": SUFFIX_PATTERN if config.encoding.url_format_suffix else "",
        # One regex per (order, token), each order's tokens in its order of preference: presets.format_token's rule.
        "negotiation": [
            [label, token, re.escape(media_type)]
            for label, order in orders.items()
            if label
            for token, media_type in negotiation_rules(order)
        ],
        "negotiated": [[token, media_type] for token, media_type in NEGOTIABLE.items()],
        # nginx waits for an instance a little longer than the app's own deadline, never less: it must not give up
        # first (and mark the instance failed) while the app still works on an answer.
        "upstream_timeout": f"{math.ceil(config.limits.request_timeout) + UPSTREAM_MARGIN}s",
        # How long nginx keeps a 200 that does not say (the app sends X-Accel-Expires with each rendition's own).
        "cache_valid": f"{config.cache_valid}s",
        # Signed ad-hoc sizes (only with signing keys; never the keys): their path prefix, the pattern of the signed
        # part (whose adhoc_key group is the original's key nginx hashes on), their fingerprint, and their
        # negotiation order ("" when their format is fixed).
        "adhoc": {
            "prefix": ADHOC,
            "pattern": ADHOC_PATTERN,
            "fingerprint": adhoc_fingerprint(config),
            "order": order_label(adhoc),
        }
        if adhoc
        else {},
    }


def render_nginx_conf(**variables: object) -> str:
    """The nginx.conf for ``variables`` (listed at the top of the template); a missing one is an error."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATE.parent),
        undefined=jinja2.StrictUndefined,  # a variable the template needs but nobody set is an error
        trim_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )
    return env.get_template(TEMPLATE.name).render(**variables)


def main() -> None:
    parser = argparse.ArgumentParser(description="Print the nginx template variables derived from a phizer config.")
    parser.add_argument("--config", help="config file (default: $PHIZER_CONFIG, else the bundled default)")
    print(json.dumps(config_vars(load_config(parser.parse_args().config)), indent=1))


if __name__ == "__main__":
    main()
