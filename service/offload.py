"""CPU-bound rendering on native threads, off gevent's event loop.

A gevent worker serves all its requests on one thread: while Pillow decodes a 20 MP JPEG (100 ms and more), no
other request of the instance makes progress, not its origin fetches, not its memcached timeouts, not gunicorn's
heartbeat. Pillow releases the GIL while it decodes, resamples and encodes, so rendering on a few native threads
keeps the loop responsive, and lets an instance use an idle core when nginx's hash sends it more than its share
of the work (with two instances, consistent hashing easily splits a page's originals 2:1). How many renders run at
once on the whole host is decided by service/budget.py, not by the size of these pools.

The budget fills every core with renders, so render threads run at a lower scheduling priority (``RENDER_NICENESS``):
the instances' event loops (``/healthz``, hits revalidated, 503s, origin fetches), nginx and memcached then take a
core from a render at once instead of sharing it equally (measured in tests/test_overload.py: at equal priority a
burst of misses held ``/healthz`` through nginx 300-500 ms on a busy 2-core host). A render loses nothing when the
serving path is idle.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Generic, Protocol, TypeVar

from gevent import monkey

T = TypeVar("T")
RENDER_NICENESS = 10  # added to a render thread's nice value (Linux schedules threads one by one)


class Pending(Generic[T]):
    """A function running on a native thread; ``get`` waits for its result (``TimeoutError`` past ``timeout``)."""

    def __init__(self, wait: Callable[[float | None], T]) -> None:
        self._wait = wait

    def get(self, timeout: float | None = None) -> T:
        return self._wait(timeout)


Spawn = Callable[[Callable[[], Any]], Pending[Any]]


def make_spawn(threads: int) -> Spawn:
    """A function that starts ``fn()`` on one of ``threads`` native threads (0: one per core).

    Under gevent's monkey-patching, ``threading`` makes greenlets, not threads: gevent's own pool is the way to
    a native thread, and waiting on it yields to the loop. Without gevent (tests, tools) a plain executor.
    """
    threads = threads or os.cpu_count() or 1
    if monkey.is_module_patched("threading"):
        import gevent
        from gevent.threadpool import ThreadPool

        pool = ThreadPool(threads)

        def spawn_gevent(fn: Callable[[], Any]) -> Pending[Any]:
            # The outcome comes back as a value: gevent's pool prints a traceback for every exception raised on
            # its threads, and a 413 for a bomb is an answer, not an error to log (it would bury the real ones).
            result = pool.spawn(_outcome, fn)

            def wait(timeout: float | None) -> Any:
                try:
                    raised, value = result.get(timeout=timeout)
                except gevent.Timeout as exc:
                    raise TimeoutError from exc
                if raised:
                    raise value
                return value

            return Pending(wait)

        return spawn_gevent
    executor = ThreadPoolExecutor(threads, thread_name_prefix="render", initializer=lower_priority)
    return lambda fn: Pending(executor.submit(fn).result)


def _outcome(fn: Callable[[], T]) -> tuple[bool, Any]:
    """``(False, fn())``, or ``(True, the exception it raised)``."""
    try:
        lower_priority()
        return False, fn()
    except Exception as exc:
        return True, exc


def lower_priority() -> None:
    """Give the calling native thread (a render thread) ``RENDER_NICENESS`` more than the process (see above).

    Set from the main thread's value (a thread id of 0 would mean this very thread), so calling it again changes
    nothing; a system without per-thread priorities (or one that refuses) only loses the preference, never a render.
    """
    get_native_id = monkey.get_original("threading", "get_native_id")  # gevent's would be a greenlet's id
    with contextlib.suppress(OSError, AttributeError):
        wanted = os.getpriority(os.PRIO_PROCESS, os.getpid()) + RENDER_NICENESS  # the main thread's, not ours
        thread = get_native_id()
        if os.getpriority(os.PRIO_PROCESS, thread) != wanted:
            os.setpriority(os.PRIO_PROCESS, thread, wanted)


def native_lock() -> Any:
    """A lock between native threads even under monkey-patching (gevent's patched locks are for greenlets).

    Only for short critical sections: a hub thread waiting on it blocks every greenlet meanwhile.
    """
    return monkey.get_original("_thread", "allocate_lock")()


class Doorbell(Protocol):
    """Wakes the event loop's waiters at once when something they wait for happens; rung from any thread.

    A render thread that frees a slot rings its instance's bell, so the head of the line takes the slot at once
    instead of at its next poll (service/budget.py). ``ticket()`` is taken before looking at what is waited for,
    and ``wait(ticket, timeout)`` returns at once if the bell rang since: a ring between the look and the wait is
    never lost.
    """

    def ticket(self) -> object: ...

    def ring(self) -> None: ...

    def wait(self, ticket: object, timeout: float) -> None: ...


class ThreadDoorbell:
    """The bell without gevent (tests, tools): waiters are plain threads."""

    def __init__(self) -> None:
        self._rung = 0
        self._cond = threading.Condition()

    def ticket(self) -> object:
        return self._rung

    def ring(self) -> None:
        with self._cond:
            self._rung += 1
            self._cond.notify_all()

    def wait(self, ticket: object, timeout: float) -> None:
        until = time.monotonic() + timeout
        with self._cond:
            while self._rung == ticket and (remaining := until - time.monotonic()) > 0:
                self._cond.wait(remaining)


class GeventDoorbell:
    """The bell under gevent: a ring from a native thread reaches the loop through an async watcher (as gevent's
    thread pool sends its results), whose callback sets the Event the waiters hold and puts up a new one. Waiters
    and the callback all run on the loop, so nothing can ring between a ticket and its wait unseen."""

    def __init__(self) -> None:
        import gevent
        from gevent.event import Event

        self._new_event = Event
        self._event = Event()
        self._watcher = gevent.get_hub().loop.async_()
        self._watcher.ref = False  # an idle bell never keeps the loop running
        self._watcher.start(self._wake)

    def _wake(self) -> None:
        rung, self._event = self._event, self._new_event()
        rung.set()

    def ticket(self) -> object:
        return self._event

    def ring(self) -> None:
        self._watcher.send()  # thread-safe; rings before the loop runs the callback make one wake-up

    def wait(self, ticket: object, timeout: float) -> None:
        ticket.wait(timeout)  # type: ignore[attr-defined]


def make_doorbell() -> Doorbell:
    """A bell for waiters on the calling thread's event loop: gevent's under monkey-patching, else plain threads'."""
    return GeventDoorbell() if monkey.is_module_patched("threading") else ThreadDoorbell()
