"""What the routes need from whatever answers them: the single-process `Service` or the cluster gateway.

One set of routes, two backends: the cluster serves the same `/v1` API because it implements this
protocol, not because it copies the routes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from ..config import Settings
from ..messages import Delta, GenerationParams, Prompt, Result, Started
from ..metrics import Metrics


class Backend(Protocol):
    settings: Settings
    metrics: Metrics

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def readiness(self) -> dict[str, object]:
        """The `/readyz` body; raises NotReady (503) when requests would not be served."""
        ...

    async def predict(self, task: str, inputs: list[Prompt], params: GenerationParams) -> Result: ...

    def predict_stream(
        self, task: str, inputs: list[Prompt], params: GenerationParams
    ) -> AsyncIterator[Started | Delta | Result]:
        """`Started`, then text deltas as tokens are decoded, then the `Result`; closing it cancels the request."""
        ...

    async def score(self, task: str, inputs: list[str], targets: list[str]) -> Result: ...

    async def upload(self, task: str, parts: dict[str, bytes], pin: bool = False) -> dict[str, object]:
        """Validate, persist and serve a new version (pinned too, with `pin`: refused with 409 `pin_refused`, nothing
        written, where pins would pass the device budget); returns its description (and `replica`)."""
        ...

    async def delete(self, task: str) -> None: ...

    async def adapters(
        self, after: str | None, limit: int | None, residency: bool
    ) -> tuple[list[dict[str, object]], str | None]:
        """A page of tasks after `after` in task order, and the next page's cursor (None: the last page); with
        `residency`, each says where its weights are now."""
        ...

    async def adapter(self, task: str, *, residency: bool = False) -> dict[str, object]: ...

    async def pin_task(self, task: str, pinned: bool) -> dict[str, object]:
        """Keep the task on the device (never evicted) or return it to LRU; returns its description."""
        ...

    async def metrics_text(self) -> bytes: ...
