"""A slow origin for B4, in its own process: every GET waits ``--delay`` seconds, then goes to ``--upstream``.

It is the tests' CountingProxy (tests/support.py) run as a server, so the bench's client and this proxy do not
share one interpreter's GIL while the page time is measured. Prints ``listening on <url>``, then runs until
SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
import threading

from tests.support import CountingProxy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="e.g. http://127.0.0.1:5000 (moto_server)")
    parser.add_argument("--delay", type=float, default=0.2)
    args = parser.parse_args()
    proxy = CountingProxy(upstream=args.upstream)
    proxy.delay = args.delay
    print(f"listening on {proxy.url}", flush=True)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    stopped.wait()
    proxy.close()


if __name__ == "__main__":
    main()
