"""CPU-bound rendering on native threads, off gevent's event loop.

A gevent worker serves all its requests on one thread: while Pillow decodes a 20 MP JPEG (100 ms and more), no
other request of the instance makes progress, not its origin fetches, not its memcached timeouts, not gunicorn's
heartbeat. Pillow releases the GIL while it decodes, resamples and encodes, so rendering on a few native threads
keeps the loop responsive, and lets an instance use an idle core when nginx's hash sends it more than its share
of the work (with two instances, consistent hashing easily splits a page's originals 2:1).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from gevent import monkey

T = TypeVar("T")
Offload = Callable[[Callable[[], T]], T]


def make_offload(threads: int) -> Offload[Any]:
    """A function that runs ``fn()`` on one of ``threads`` native threads (0: one per core) and returns its result.

    Under gevent's monkey-patching, ``threading`` makes greenlets, not threads: gevent's own pool is the way to
    a native thread, and waiting on it yields to the loop. Without gevent (tests, tools) a plain executor.
    """
    threads = threads or os.cpu_count() or 1
    if monkey.is_module_patched("threading"):
        from gevent.threadpool import ThreadPool

        pool = ThreadPool(threads)
        return lambda fn: pool.apply(fn)
    executor = ThreadPoolExecutor(threads, thread_name_prefix="render")
    return lambda fn: executor.submit(fn).result()


def native_lock() -> Any:
    """A lock between native threads even under monkey-patching (gevent's patched locks are for greenlets).

    Only for short critical sections: a hub thread waiting on it blocks every greenlet meanwhile.
    """
    return monkey.get_original("_thread", "allocate_lock")()
