"""The Python client against the real server: every endpoint, and typed errors from real responses."""

from __future__ import annotations

import asyncio

import pytest

from kronserve_client import AsyncKronserveClient, KronserveClient
from kronserve_client.errors import InvalidInput, NotFound, UnsupportedMediaType

from .conftest import Server


def test_sync_client_round_trip(server: Server, adapter_bytes) -> None:
    with KronserveClient(server.url) as c:
        assert c.healthz() and c.readyz()
        info = c.upload("client-task", [("a.safetensors", adapter_bytes("client-task", "houlsby", seed=4))])
        assert info.task == "client-task" and info.method == "houlsby" and info.version >= 1
        assert c.get_adapter("client-task").sha256 == info.sha256
        assert "client-task" in [a.task for a in c.list_adapters()]
        out = c.predict("client-task", ["a", "b"], max_new_tokens=3)
        assert out.version == info.version and len(out.outputs) == 2
        scores = c.score("client-task", ["a"], ["b"]).scores
        assert len(scores) == 1 and scores[0] < 0
        with pytest.raises(UnsupportedMediaType) as e:
            c.upload("client-task", [("x.safetensors", b"PK\x03\x04 zip, not safetensors")])
        assert e.value.code == "unsupported_format"
        with pytest.raises(InvalidInput):
            c.score("client-task", ["a", "b"], ["c"])
        c.delete_adapter("client-task")
        with pytest.raises(NotFound) as e:
            c.predict("client-task", ["a"])
        assert e.value.code == "unknown_task"
        assert "kronserve_requests_total" in c.metrics()


def test_async_client_predicts(server: Server, adapter_bytes) -> None:
    async def run() -> list:
        async with AsyncKronserveClient(server.url) as c:
            await c.upload("async-task", [("a.safetensors", adapter_bytes("async-task", seed=5))])
            return await asyncio.gather(*(c.predict("async-task", [f"x{i}"], max_new_tokens=2) for i in range(8)))

    results = asyncio.run(run())
    assert len(results) == 8 and all(r.task == "async-task" for r in results)
