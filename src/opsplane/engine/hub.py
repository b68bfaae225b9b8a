"""Live fan-out of durable task events to subscribers (SSE streams, the CLI).

A cache of what this instance wrote: a subscriber that falls behind is dropped and resumes
from the database with its last event id, so nothing is lost and memory stays bounded.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

from opsplane.engine.changes import TaskEvent


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


class EventHub:
    def __init__(self, queue_size: int = 10_000) -> None:
        self._queue_size = queue_size
        self._subscribers: defaultdict[str, set[Subscription]] = defaultdict(set)
        self._host_subscribers: set[HostSubscription] = set()

    def subscribe_hosts(self) -> HostSubscription:
        subscription = HostSubscription()
        self._host_subscribers.add(subscription)
        return subscription

    def unsubscribe_hosts(self, subscription: HostSubscription) -> None:
        self._host_subscribers.discard(subscription)

    def publish_hosts(self, names: set[str]) -> None:
        if not names:
            return
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
        for event in events:
            for subscription in list(self._subscribers.get(event.task_id, ())):
                try:
                    subscription.queue.put_nowait(event)
                except asyncio.QueueFull:
                    subscription.overflowed.set()
                    self.unsubscribe(subscription)
