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
  for minutes. Only the head of the line tries the lock files, and a new arrival never takes a slot before those
  already waiting: with every waiter polling, the unlucky ones were overtaken again and again and shed after
  ``render_wait`` while later ones rendered at once (seen in make bench under load: p99 pinned at 2 s). A render
  thread that frees a slot rings its own instance's doorbell (service/offload.py) and sends a datagram to every
  other instance's bell (``bell-<pid>-<n>.sock`` in the folder), whose listener rings that instance's doorbell: the
  head of each line tries at once, the others in line sleep until the line moves. The head still polls every
  ``POLL`` seconds for a slot no bell announced (an instance killed mid-render). With a 2 ms poll and no bells, a
  freed slot idled 1-2 ms before a waiter took it (a page of 40 misses hands slots over about 40 times), and each
  instance with a waiting request spent 2-2.5% of a core polling.
- The lines of a host's instances are served as one, oldest first. Each instance publishes when its head of line
  arrived (``line-<pid>-<n>``, 8 bytes, in the folder), and a head, or a newcomer to an empty line, leaves a free
  slot to an older head of another instance. With a line per instance and a race for each freed slot, nginx's hash
  sending one instance twice the other's misses left that instance's line twice as long for the same share of
  slots: in make bench's page mix, its waits reached render_wait (503s, p99 1.3-2 s) while the other's requests
  rendered at once. Measured with the page mix alone (16 connections, 20 s, 2 instances): p99 1.49-1.60 s before,
  1.19-1.22 s after for WebP, 0.72-0.88 s before, 0.61-0.62 s after for JPEG, at the cost of a slot idle for a
  moment when it passes to another instance (JPEG 49.2-50.2 req/s against 50.4-52.2). A head that leaves its line
  without a slot (shed, past its deadline) rings the other instances' bells, as a freed slot does: one of them
  may have been leaving the slot to it. A published head older than ``render_wait`` plus a second, or of a
  process that is gone, is ignored (an instance killed while it had a line).
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

import _socket
import atexit
import fcntl
import itertools
import logging
import os
import struct
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from gevent import monkey

from service.errors import GatewayTimeout, Overloaded
from service.metrics import RENDERS_IN_FLIGHT, RENDERS_QUEUED, Timings
from service.offload import Spawn, make_doorbell, native_lock

log = logging.getLogger(__name__)
T = TypeVar("T")
# seconds between the head of the line's attempts at a slot (one flock call per slot) when no bell rang: only
# slots no bell announced (a killed instance's) wait for it
POLL = 0.05
_BUDGETS = itertools.count()  # names each budget's bell and head of line (two instances may share a process)


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
    """``slots`` lock files in ``folder``, shared by every process that opens the same folder.

    A process that frees a slot also tells the others that listen (``listen``): one datagram to each ``bell-*.sock``
    in the folder, so another instance's waiting request takes the slot at once. Best effort: a bell that cannot be
    reached (its process is gone, its queue is full) is skipped, and waiters still poll for what no bell announced
    (a killed process's slots, freed by the kernel).
    """

    def __init__(self, slots: int, folder: str | os.PathLike[str] | None = None) -> None:
        # Without a shared folder the slots are this process's own, in a folder removed with the budget.
        self._private: tempfile.TemporaryDirectory[str] | None = None
        if not folder:
            self._private = tempfile.TemporaryDirectory(prefix="phizer-slots-")
            folder = self._private.name
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.slots = slots
        self._fds = [os.open(self.folder / f"slot-{i}.lock", os.O_RDWR | os.O_CREAT, 0o660) for i in range(slots)]
        self._held: set[int] = set()
        self._lock = native_lock()  # release() runs on render threads, try_acquire() on the event loop
        # _socket, not socket: gevent's patched sockets belong to the event loop, and release() runs on render threads
        self._sender = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        self._bell: Path | None = None
        self._name = f"{os.getpid()}-{next(_BUDGETS)}"  # this budget's bell and published head of line
        self._head = self.folder / f"line-{self._name}"  # when this line's head arrived, or 0
        self._head_fd = os.open(self._head, os.O_RDWR | os.O_CREAT, 0o660)
        self.publish(None)
        atexit.register(self._head.unlink, missing_ok=True)

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
        self.ring_others()

    def publish(self, since: float | None) -> None:
        """Tell the other instances when this instance's head of line arrived (``time.monotonic()``, the same
        clock in every process of the host), or that its line is empty (None)."""
        os.pwrite(self._head_fd, struct.pack("<d", since or 0.0), 0)

    def older_waiting(self, since: float, max_age: float) -> bool:
        """Whether another live instance's head of line arrived before ``since`` (and less than ``max_age`` seconds
        ago: an older one is not waiting any more). A killed instance's head is never waited for: its file is
        removed."""
        if self._private is not None:
            return False
        oldest = time.monotonic() - max_age
        for line in self.folder.glob("line-*"):
            if line == self._head:
                continue
            try:
                fd = os.open(line, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                raw = os.pread(fd, 8, 0)
            finally:
                os.close(fd)
            other = struct.unpack("<d", raw)[0] if len(raw) == 8 else 0.0
            if not other or other >= since:
                continue
            # A killed instance leaves its head behind: never wait for it (its slots are already free), however
            # recent. The liveness check runs only for an older head, not on every attempt.
            if not _alive(int(line.name.split("-")[1])):
                line.unlink(missing_ok=True)
            elif oldest < other:
                return True
        return False

    def ring_others(self) -> None:
        """One datagram to every other instance's bell: a slot may be theirs to take."""
        for bell in self.folder.glob("bell-*.sock"):
            if bell == self._bell:
                continue
            try:
                self._sender.sendto(b"\0", _socket.MSG_DONTWAIT, str(bell))
            except ConnectionRefusedError:  # left behind by a process that is gone
                bell.unlink(missing_ok=True)
            except OSError:  # gone meanwhile, or its queue is full: it has been told already
                pass

    def listen(self, ring: Callable[[], None]) -> None:
        """Call ``ring()`` (on a native thread of its own) whenever another process frees a slot of the folder.

        Nothing to listen to (no bell) when the socket cannot be made, e.g. a folder path too long for a unix
        socket: waiters then find other processes' slots by polling alone, as before bells.
        """
        if self._private is not None:
            return  # no other process can free these slots
        bell = self.folder / f"bell-{self._name}.sock"
        listener = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
        try:
            bell.unlink(missing_ok=True)  # a previous process with this pid
            listener.bind(str(bell))
        except OSError as exc:
            listener.close()
            log.warning("render budget: no bell at %s (%s): other instances' freed slots are found by polls", bell, exc)
            return
        self._bell = bell
        atexit.register(bell.unlink, missing_ok=True)  # a stopped instance leaves no socket behind

        def receive() -> None:
            while True:
                listener.recv(64)
                ring()

        monkey.get_original("_thread", "start_new_thread")(receive, ())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


class _Ticket:
    """A request waiting in its instance's line, with when it arrived."""

    __slots__ = ("since",)

    def __init__(self, since: float) -> None:
        self.since = since


class Renderer:
    """Runs renders within the budget: wait a bounded time for a slot, never start past the deadline."""

    def __init__(self, budget: RenderBudget, spawn: Spawn, wait: float, queue: int) -> None:
        self.budget = budget
        self.spawn = spawn
        self.wait = wait
        self.queue = queue
        self._line: deque[_Ticket] = deque()  # this instance's waiting requests, in order (only on the event loop)
        self._bell = make_doorbell()  # rung when a render (of any instance) frees its slot, or the line moves
        budget.listen(self._bell.ring)

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
                self._bell.ring()

        RENDERS_IN_FLIGHT.inc()
        try:
            return self.spawn(run).get(timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError as exc:
            raise GatewayTimeout("render did not finish before the request's deadline") from exc
        finally:
            RENDERS_IN_FLIGHT.dec()

    def _acquire(self, deadline: float) -> int:
        now = time.monotonic()
        max_age = self.wait + 1.0  # a published head older than this is not waiting any more (see the docstring)
        # never ahead of those already waiting: in this line, or at the head of an older line of another instance
        if not self._line and not self.budget.older_waiting(now, max_age):
            slot = self.budget.try_acquire()
            if slot is not None:
                return slot
        if self.waiting >= self.queue:
            raise Overloaded("too many images waiting to be rendered", retry_after=1)
        until = min(deadline, now + self.wait)
        ticket = _Ticket(now)
        self._line.append(ticket)
        if len(self._line) == 1:
            self.budget.publish(now)
        RENDERS_QUEUED.inc()
        slot = None
        try:
            while (remaining := until - time.monotonic()) > 0:
                seen = self._bell.ticket()
                head = self._line[0] is ticket
                if head and not self.budget.older_waiting(ticket.since, max_age):
                    slot = self.budget.try_acquire()
                    if slot is not None:
                        return slot
                self._bell.wait(seen, min(POLL, remaining) if head else remaining)
        finally:
            was_head = self._line[0] is ticket
            self._line.remove(ticket)
            if was_head:
                self.budget.publish(self._line[0].since if self._line else None)
                if slot is None:  # shed: another instance's head may have been leaving a free slot to this one
                    self.budget.ring_others()
            self._bell.ring()  # the next in line may be the head now
            RENDERS_QUEUED.dec()
        raise Overloaded("busy rendering other images", retry_after=1)
