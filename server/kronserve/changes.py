"""The change feed: how a process learns of versions another process put in the shared store.

Two paths, so a lost message only delays: a Redis pub/sub channel (when `redis_url` is set) that
every upload and delete publishes its task id on, and a poll of the store's `epoch()` every
`poll_s` seconds. Either way the process refreshes only tasks it holds: a task it does not serve
is loaded on demand when a request for it arrives (the gateway pins the version it read).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from typing import Any

from .errors import KronserveError
from .registry import Registry

log = logging.getLogger(__name__)
CHANNEL = "kronserve:changes"


class ChangeFeed:
    def __init__(self, registry: Registry, redis_url: str | None, poll_s: float) -> None:
        self.registry, self.redis_url, self.poll_s = registry, redis_url, poll_s
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._outbox: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._redis: Any = None
        if redis_url:
            import redis  # the cluster extra; a single process without --redis never needs it

            self._redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)

    def start(self) -> None:
        if self._redis is not None:
            self._spawn(self._listen, "kronserve-feed-redis")
            self._spawn(self._send, "kronserve-feed-publish")
        if self.poll_s > 0:
            self._spawn(self._poll, "kronserve-feed-poll")

    def stop(self) -> None:
        self._stop.set()
        self._outbox.put(None)
        for t in self._threads:
            t.join(timeout=5)

    def publish(self, task: str) -> None:
        """Tell every other process that `task` changed. Never blocks the caller: a slow or absent Redis
        must not stall an upload; a message that cannot be sent only delays the others until their poll."""
        if self._redis is not None:
            self._outbox.put(task)

    def _send(self) -> None:
        while (task := self._outbox.get()) is not None:
            try:
                self._redis.publish(CHANNEL, task)
            except Exception as e:  # redis raises many kinds; the epoch poll covers all of them
                log.warning("change feed: could not publish %r (%s); pollers will see it", task, e)

    def _spawn(self, target: Any, name: str) -> None:
        t = threading.Thread(target=target, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(CHANNEL)
                with contextlib.closing(pubsub):
                    while not self._stop.is_set():
                        message = pubsub.get_message(timeout=0.5)
                        if message is not None:
                            self._refresh(message["data"].decode(errors="replace"))
            except Exception as e:
                log.warning("change feed: redis unavailable (%s); retrying in 1 s", e)
                self._stop.wait(1)

    def _poll(self) -> None:
        """Rescan the held tasks when the epoch moved; a scan with a failure is retried at the next tick."""
        seen = self._epoch()
        while not self._stop.wait(self.poll_s):
            now = self._epoch()
            if now is not None and now != seen:
                refreshed = [self._refresh(entry.task) for entry in self.registry.entries()]
                if all(refreshed):
                    seen = now

    def _epoch(self) -> str | None:
        try:
            return self.registry.store.epoch() if self.registry.store else None
        except Exception as e:
            log.warning("change feed: cannot read the store epoch (%s)", e)
            return None

    def _refresh(self, task: str) -> bool:
        if self.registry.peek(task) is None:
            return True  # not served here: loaded on demand if a request for it comes
        try:
            self.registry.refresh(task)
            return True
        except Exception as e:
            code = e.code if isinstance(e, KronserveError) else "internal"
            self.registry.metrics.adapter_load_failures.labels("store", code).inc()
            log.error("change feed: cannot refresh %r: %s", task, e)
            return False
