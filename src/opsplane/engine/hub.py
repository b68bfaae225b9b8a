"""Live fan-out of durable task events to subscribers (SSE streams, the CLI).

A cache of what this instance wrote: a subscriber that falls behind is dropped and resumes
from the database with its last event id, so nothing is lost and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict, defaultdict
from collections.abc import Callable

from opsplane.engine.changes import TaskEvent

log = logging.getLogger(__name__)

# Called with every batch of events of every task, synchronously, right after their commit.
Listener = Callable[[list[TaskEvent]], None]


class Subscription:
    """One subscriber's queue of events for one task."""

    def __init__(self, task_id: str, maxsize: int) -> None:
        self.task_id = task_id
        self.queue: asyncio.Queue[TaskEvent] = asyncio.Queue(maxsize)
        self.overflowed = asyncio.Event()


class HostSubscription:
    """Names of hosts changed since the subscriber last looked: coalesced, so memory is bounded
    by the fleet size however fast heartbeats arrive."""

    def __init__(self) -> None:
        self.changed: set[str] = set()
        self.wakeup = asyncio.Event()

    def take(self) -> set[str]:
        names, self.changed = self.changed, set()
        self.wakeup.clear()
        return names


class HostChangeLog:
    """Which hosts changed after a point of the fleet stream, so that a page that reconnects
    gets only those (a delta) rather than reloading the fleet.

    Every published change takes the next version; each host keeps only its latest, in version
    order, so the log holds one entry per host (bounded by ``size``: the oldest entries go,
    and a point older than what remains cannot be resumed). A point is ``<epoch>.<version>``;
    the epoch is this process's, so a point from another process (a restart, another
    instance) is never mistaken for one of ours."""

    def __init__(self, size: int = 200_000) -> None:
        self.epoch = secrets.token_hex(4)
        self._size = size
        self._version = 0
        self._floor = 0  # versions up to this one may have been dropped
        self._latest: OrderedDict[str, int] = OrderedDict()

    def record(self, names: set[str]) -> None:
        self._version += 1
        for name in names:
            self._latest[name] = self._version
            self._latest.move_to_end(name)
        while len(self._latest) > self._size:
            _, dropped = self._latest.popitem(last=False)
            self._floor = max(self._floor, dropped)

    def point(self) -> str:
        """The stream position now: every change so far is before it."""
        return f"{self.epoch}.{self._version}"

    def since(self, point: str) -> set[str] | None:
        """Hosts changed after ``point``; None when it cannot be told (a point of another
        process, malformed, or older than the log): the client reloads the list then."""
        epoch, _, number = point.partition(".")
        if epoch != self.epoch or not number.isdigit() or len(number) > 18:
            return None
        version = int(number)
        if version < self._floor or version > self._version:
            return None
        changed: set[str] = set()
        for name in reversed(self._latest):
            if self._latest[name] <= version:
                break
            changed.add(name)
        return changed


class EventHub:
    def __init__(self, queue_size: int = 10_000) -> None:
        self._queue_size = queue_size
        self._subscribers: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._host_subscribers: set[HostSubscription] = set()
        self._listeners: list[Listener] = []
        self._cluster_listeners: list[Listener] = []
        self.host_log = HostChangeLog()

    def add_listener(self, listener: Listener, *, cluster: bool = False) -> None:
        """Observe the events of all tasks this instance wrote (metrics) or, with ``cluster``,
        those every instance wrote (alerts, delivered by one instance: docs/instances.md). A
        listener runs inline on the write path: it must be quick and must not block; its
        errors are logged, not raised."""
        (self._cluster_listeners if cluster else self._listeners).append(listener)

    def remove_listener(self, listener: Listener) -> None:
        for listeners in (self._listeners, self._cluster_listeners):
            if listener in listeners:
                listeners.remove(listener)

    def _tell(self, listeners: list[Listener], events: list[TaskEvent]) -> None:
        for listener in listeners:
            try:
                listener(events)
            except Exception:
                log.exception("task event listener %r failed", listener)

    def subscribe_hosts(self) -> HostSubscription:
        subscription = HostSubscription()
        self._host_subscribers.add(subscription)
        return subscription

    def unsubscribe_hosts(self, subscription: HostSubscription) -> None:
        self._host_subscribers.discard(subscription)

    def publish_hosts(self, names: set[str]) -> None:
        if not names:
            return
        self.host_log.record(names)
        for subscription in self._host_subscribers:
            subscription.changed |= names
            subscription.wakeup.set()

    def subscribe(self, task_id: str) -> Subscription:
        subscription = Subscription(task_id, self._queue_size)
        self._subscribers[task_id].add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscribers = self._subscribers.get(subscription.task_id)
        if subscribers is not None:
            subscribers.discard(subscription)
            if not subscribers:
                del self._subscribers[subscription.task_id]

    def publish(self, events: list[TaskEvent]) -> None:
        if events:
            self._tell(self._listeners, events)
        self.publish_foreign(events)

    def publish_foreign(self, events: list[TaskEvent]) -> None:
        """Events another instance committed (docs/instances.md): to this instance's
        subscribers and cluster listeners. The other listeners (metrics) saw them on the
        instance that wrote them: here they would count twice."""
        if events:
            self._tell(self._cluster_listeners, events)
        for event in events:
            for subscription in list(self._subscribers.get(event.task_id, ())):
                try:
                    subscription.queue.put_nowait(event)
                except asyncio.QueueFull:
                    subscription.overflowed.set()
                    self.unsubscribe(subscription)


class RecentIds:
    """The last ``size`` ids seen, for listeners that must act once per id (a task's end) even
    if an event about it came twice; memory stays bounded."""

    def __init__(self, size: int = 100_000) -> None:
        self._size = size
        self._ids: OrderedDict[str, None] = OrderedDict()

    def first_time(self, key: str) -> bool:
        """True the first time ``key`` is seen (within the last ``size`` keys)."""
        if key in self._ids:
            return False
        self._ids[key] = None
        if len(self._ids) > self._size:
            self._ids.popitem(last=False)
        return True
