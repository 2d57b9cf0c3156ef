"""Rendering nginx/nginx.conf.j2, the one nginx configuration, from Python (launcher, tests).

Ansible renders the same file with its template module; this does it the same way (trim_blocks on), so a
variable or filter that works here works there.
"""

from __future__ import annotations

import jinja2

from service.config import REPO_ROOT

TEMPLATE = REPO_ROOT / "nginx" / "nginx.conf.j2"


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
