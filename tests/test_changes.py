"""The change feed: a process learns of versions another process put in the shared store, within 1 s."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kronserve.backbone import Backbone, load_backbone
from kronserve.changes import ChangeFeed
from kronserve.engine import Engine
from kronserve.formats.native import dumps
from kronserve.store import LocalStore

from .conftest import make_adapter

WITHIN_S = 1.0


@pytest.fixture
def two(backbone: Backbone, tiny_dir: Path, tmp_path: Path) -> tuple[Engine, Engine]:
    """Two engines (two processes' worth of backbone, registry and bank) over one store."""
    other = load_backbone(str(tiny_dir), device="cpu")
    return Engine(backbone, store=LocalStore(tmp_path)), Engine(other, store=LocalStore(tmp_path))


@pytest.fixture
def feeds() -> Iterator[Callable[..., ChangeFeed]]:
    started: list[ChangeFeed] = []

    def make(engine: Engine, redis_url: str | None, poll_s: float) -> ChangeFeed:
        feed = ChangeFeed(engine.registry, redis_url, poll_s)
        feed.start()
        started.append(feed)
        return feed

    yield make
    for feed in started:
        feed.stop()


def wait_for(condition: Callable[[], bool], within: float = WITHIN_S) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < within, f"not within {within} s"
        time.sleep(0.01)
    return time.monotonic() - started


@pytest.mark.parametrize("path", ["redis", "poll"])
def test_upload_and_delete_elsewhere_reach_a_process_that_holds_the_task(
    two: tuple[Engine, Engine], feeds, backbone: Backbone, redis_url: str, path: str
) -> None:
    a, b = two
    feed_a = feeds(a, redis_url if path == "redis" else None, 0.0)
    feeds(b, redis_url if path == "redis" else None, 0.2 if path == "poll" else 0.0)
    time.sleep(0.2)  # subscribers connected
    adapters = [make_adapter(backbone, "t", "compacter", seed=s, std=0.3) for s in (1, 2)]
    a.registry.upload("t", dumps(adapters[0]))
    b.registry.refresh("t")  # b serves t (the ring gave it to b, or a request made b load it)
    v2 = a.registry.upload("t", dumps(adapters[1]))
    feed_a.publish("t")
    wait_for(lambda: (e := b.registry.peek("t")) is not None and e.sha256 == v2.sha256)
    inputs, targets = ["a question"], ["an answer"]
    assert b.score(["t"], inputs, targets).scores == pytest.approx(a.score(["t"], inputs, targets).scores, abs=1e-5)
    a.registry.delete("t")
    feed_a.publish("t")
    wait_for(lambda: b.registry.peek("t") is None)


def test_a_lost_message_only_delays_until_the_next_poll(
    two: tuple[Engine, Engine], feeds, backbone: Backbone, redis_url: str
) -> None:
    a, b = two
    feeds(b, redis_url, 0.2)
    a.registry.upload("t", dumps(make_adapter(backbone, "t", "houlsby", seed=1, std=0.3)))
    b.registry.refresh("t")
    v2 = a.registry.upload("t", dumps(make_adapter(backbone, "t", "houlsby", seed=2, std=0.3)))  # nobody publishes
    wait_for(lambda: b.registry.peek("t").sha256 == v2.sha256)


def test_tasks_a_process_does_not_hold_stay_unloaded(
    two: tuple[Engine, Engine], feeds, backbone: Backbone, redis_url: str
) -> None:
    a, b = two
    feed_a = feeds(a, redis_url, 0.0)
    feeds(b, redis_url, 0.1)
    time.sleep(0.2)
    a.registry.upload("other", dumps(make_adapter(backbone, "other", "pfeiffer", seed=1, std=0.3)))
    feed_a.publish("other")
    time.sleep(0.5)
    assert b.registry.peek("other") is None and b.registry.resident() == 0


def test_publishing_never_waits_for_an_unreachable_redis(engine: Engine) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]  # nothing listens here once the socket closes
    feed = ChangeFeed(engine.registry, f"redis://127.0.0.1:{closed}/0", 0.0)
    feed.start()
    try:
        started = time.monotonic()
        for _ in range(3):
            feed.publish("t")
        assert time.monotonic() - started < 1.0  # each Redis attempt alone may take its 2 s connect timeout
    finally:
        feed.stop()


def test_a_refresh_that_finds_the_task_gone_updates_the_gauges(two: tuple[Engine, Engine], backbone: Backbone) -> None:
    """kronserve_adapters_active/_resident follow a deletion learnt from the store, not only a local one."""
    a, b = two
    a.registry.upload("t", dumps(make_adapter(backbone, "t", "compacter", seed=1, std=0.3)))
    b.registry.refresh("t")

    def gauge(name: str) -> float | None:
        return b.registry.metrics.registry.get_sample_value(name)

    assert (gauge("kronserve_adapters_active"), gauge("kronserve_adapters_resident")) == (1, 1)
    a.registry.delete("t")
    assert b.registry.refresh("t") is None
    assert (gauge("kronserve_adapters_active"), gauge("kronserve_adapters_resident")) == (0, 0)
