"""The host-wide render budget, bounded waiting and per-request deadlines: calm under a burst of misses.

Renders are CPU-bound. Every host runs one instance per core, and each instance may render on several native
threads (service/offload.py) so that an idle core can be borrowed when nginx's hash sends one instance more than
its share. Left alone, that is cores x cores renders at once and an unbounded queue: a burst of uncached images
makes every request slow, nginx gives up while the renders go on, and the host is down for everyone.

So every render first takes one of ``render_threads`` slots shared by all instances of the host:

- A slot is a lock file (``slot-N.lock`` in ``$PHIZER_SLOTS_DIR``) held with ``flock``. The kernel releases a
  process's locks when it dies, so an instance killed mid-render (SIGKILL, OOM) never leaks a slot, and no
  coordinator process or shared memory is needed. Without ``PHIZER_SLOTS_DIR`` the instance keeps a private set.
- A miss that finds no free slot waits in its instance's line, first come first served, at most
  ``limits.render_wait`` seconds and never past its deadline; at most ``limits.render_queue`` requests of an
  instance wait at once. Beyond either it gets ``503`` with ``Retry-After`` at once: shed honestly, never queued
  for minutes. Only the head of the line polls the lock files (every ``POLL`` seconds: a slot freed by another
  instance cannot wake it, and a short poll keeps a freed slot from idling); a slot freed by one of the instance's
  own renders wakes it at once (under a burst a slot changes hands once per render, and each handover idled it half
  a poll on average), the others sleep until they are the head (each of them waking every poll kept the event loop
  busy with a burst's whole line), and a new arrival never takes a slot
  before those already waiting: with every waiter polling, the unlucky ones were overtaken again and again and shed
  after ``render_wait`` while later ones rendered at once (seen in make bench under load: p99 pinned at 2 s).
- A full line is seen before any origin work: a miss that arrives while ``render_queue`` others of its instance
  wait gets its 503 at once, before its original is fetched, hashed and stored in memcached (it would find the
  line full after its fetch as well, unless a slot freed meanwhile). A burst of distinct misses otherwise fetched
  every original it then shed: requests to the origin, and the instance's event loop busy with bytes no render
  would use. Misses still fetching are not counted: a page of slow-origin misses must overlap its fetches (the
  line fills only when they arrive together, after them).
- The request's deadline (``limits.request_timeout``, from the start of the request: origin fetch, wait and render)
  is checked before the render starts (a render past its deadline is never started) and bounds the wait for its
  result (504). A render already running cannot be interrupted inside Pillow: it finishes (bounded by the pixel and
  decode-cost limits) and only then gives its slot back, so the host is never oversubscribed.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gevent import monkey

from service.errors import GatewayTimeout, Overloaded
from service.metrics import RENDERS_IN_FLIGHT, RENDERS_QUEUED, Timings
from service.offload import Spawn, native_lock

T = TypeVar("T")
POLL = 0.002  # seconds between the head of the line's attempts at a slot (one flock call per slot)


def before_deadline(fn: Callable[[], T], deadline: float) -> T:
    """Run ``fn`` (an origin fetch), giving up with 504 at ``deadline``.

    Under gevent the timeout interrupts ``fn``'s socket waits as gevent's own Timeout, a BaseException: libraries
    that catch Exception and retry (botocore wraps any error of a send in a retryable one) cannot swallow it, and
    urllib3 closes the connection it interrupted. Without gevent (tests, tools) the origins' own timeouts bound
    ``fn`` and the deadline is checked after it. Not for memcached: its pool would lose the interrupted client,
    and its own short timeouts bound it anyway.
    """
    remaining = deadline - time.monotonic()
    late = GatewayTimeout("the original did not arrive before the request's deadline")
    if remaining <= 0:
        raise late
    if not monkey.is_module_patched("socket"):
        result = fn()
    else:
        import gevent

        timeout = gevent.Timeout(remaining)
        try:
            with timeout:
                result = fn()
        except gevent.Timeout as exc:
            if exc is not timeout:
                raise
            raise late from None
    if time.monotonic() > deadline:
        raise late
    return result


class RenderBudget:
    """``slots`` lock files in ``folder``, shared by every process that opens the same folder."""

    def __init__(self, slots: int, folder: str | os.PathLike[str] | None = None) -> None:
        # Without a shared folder the slots are this process's own, in a folder removed with the budget.
        self._private: tempfile.TemporaryDirectory[str] | None = None
        if not folder:
            self._private = tempfile.TemporaryDirectory(prefix="phizer-slots-")
            folder = self._private.name
        path = Path(folder)
        path.mkdir(parents=True, exist_ok=True)
        self.slots = slots
        self._fds = [os.open(path / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT, 0o660) for i in range(slots)]
        self._held: set[int] = set()
        self._lock = native_lock()  # release() runs on render threads, try_acquire() on the event loop

    def try_acquire(self) -> int | None:
        """A free slot of the host, taken; None when all are busy."""
        with self._lock:
            for slot, fd in enumerate(self._fds):
                if slot in self._held:
                    continue
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                self._held.add(slot)
                return slot
        return None

    def release(self, slot: int) -> None:
        with self._lock:
            fcntl.flock(self._fds[slot], fcntl.LOCK_UN)
            self._held.discard(slot)


class Renderer:
    """Runs renders within the budget: wait a bounded time for a slot, never start past the deadline."""

    def __init__(self, budget: RenderBudget, spawn: Spawn, wait: float, queue: int) -> None:
        self.budget = budget
        self.spawn = spawn
        self.wait = wait
        self.queue = queue
        # This instance's waiting requests, in order (only on the event loop): each one's event is set when it becomes
        # the head of the line.
        self._line: deque[threading.Event] = deque()
        # Set when one of this instance's renders gave its slot back (on the event loop too: under gevent, a
        # cooperative Event; the render thread itself never touches it).
        self._freed = threading.Event()

    @property
    def waiting(self) -> int:
        """Requests of this instance waiting for a slot."""
        return len(self._line)

    def admit(self) -> None:
        """Before a miss's origin fetch: 503 at once when this instance's line is already full (see above)."""
        if self._line and self.waiting >= self.queue:
            raise Overloaded("too many images waiting to be rendered", retry_after=1)

    def render(self, fn: Callable[[], T], deadline: float, timings: Timings | None = None) -> T:
        """``fn()`` on a render thread, once a slot is free; ``timings`` learns the wait. Metrics are only touched
        here, on the event loop: prometheus_client's locks are gevent's after monkey-patching, not for threads."""
        timings = timings if timings is not None else Timings()
        with timings.stage("wait"):
            slot = self._acquire(deadline)
        if time.monotonic() >= deadline:
            self.budget.release(slot)
            raise GatewayTimeout("render did not start before the request's deadline")

        def run() -> T:
            try:
                return fn()
            finally:
                self.budget.release(slot)  # only when the render is over, even if its request gave up

        RENDERS_IN_FLIGHT.inc()
        try:
            return self.spawn(run).get(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            raise GatewayTimeout("render did not finish before the request's deadline") from exc
        finally:
            RENDERS_IN_FLIGHT.dec()
            # The slot is back (run's finally; after a 504 it is not yet, and the head's attempt just fails): the head
            # of the line takes it now, not at its next poll.
            self._freed.set()

    def _acquire(self, deadline: float) -> int:
        slot = None if self._line else self.budget.try_acquire()  # never ahead of those already waiting
        if slot is not None:
            return slot
        if self.waiting >= self.queue:
            raise Overloaded("too many images waiting to be rendered", retry_after=1)
        until = min(deadline, time.monotonic() + self.wait)
        ticket = threading.Event()  # set when this request becomes the head of the line
        self._line.append(ticket)
        RENDERS_QUEUED.inc()
        try:
            while (remaining := until - time.monotonic()) > 0:
                if self._line[0] is not ticket:
                    ticket.wait(remaining)  # no polling behind the head (a greenlet switch under gevent)
                    continue
                slot = self.budget.try_acquire()
                if slot is not None:
                    return slot
                if self._freed.wait(min(POLL, remaining)):
                    self._freed.clear()
        finally:
            head = self._line[0] is ticket
            self._line.remove(ticket)
            if head and self._line:
                self._line[0].set()  # the next in line is the head now
            RENDERS_QUEUED.dec()
        raise Overloaded("busy rendering other images", retry_after=1)
