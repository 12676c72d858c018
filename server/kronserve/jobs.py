"""A request inside the server: what the API admitted (tokenized, leased) and where its answer goes.

The event loop creates a `Job` and awaits its future; the engine thread resolves it. Everything the two
threads share is here: `cancelled` (set by the event loop when the caller gives up, read by the engine
at its next step), the future (answered thread-safely), and the lease (released exactly once, by
whichever side ends the job).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from .compact import Compact
from .messages import GenerationParams, StreamedToken, TokenIds
from .registry import Entry


class TokenStream:
    """A running request's tokens as the engine picks them, delivered in order on the event loop.

    The engine thread `push`es one step's (input index, token) pairs at a time (one hand-over per request per
    step, not per token); the event loop reads `queue` and may `stop` an input (a stop string appeared): the
    engine ends that sequence at its next step.
    """

    def __init__(self) -> None:
        self.queue: asyncio.Queue[list[StreamedToken]] = asyncio.Queue()
        self.stopped: set[int] = set()
        self._loop = asyncio.get_running_loop()

    def push(self, pairs: list[StreamedToken]) -> None:
        self._loop.call_soon_threadsafe(self.queue.put_nowait, pairs)

    def stop(self, index: int) -> None:
        self.stopped.add(index)


@dataclass(eq=False)
class Job:
    entry: Entry  # leased at acceptance: the version this request is answered with
    packed: Compact  # its weights, fetched into the host tier at acceptance (the engine only copies them)
    inputs: list[list[int]]  # token ids, EOS included
    targets: list[list[int]] | None  # score requests
    params: GenerationParams | None  # predict requests (None: score)
    deadline: float  # time.monotonic() after which nobody waits for the answer (a stream's moves with its tokens)
    future: asyncio.Future[Any]
    accepted: float = field(default_factory=time.perf_counter)  # when the scheduler took it (queue wait from here)
    cancelled: bool = False  # the caller gave up (set on the event loop)
    failed: bool = False  # the engine answered it with an error while its other rows still ran
    stream: TokenStream | None = None
    patience_s: float = 0.0  # a stream's deadline is this long after its last token (set by the engine thread)
    slot: int | None = None  # its device slot while the engine holds it there (from admission to leaving)
    next_input: int = 0  # inputs before this one are admitted (a request may be admitted over several steps)
    stalled: bool = False  # started, and passed over at the last step (it goes first at the next)
    outputs: list[list[int] | None] = field(default_factory=list)  # each input's tokens once its sequence is done
    logprobs: list[list[TokenIds] | None] = field(default_factory=list)  # ... and their log-probabilities, if asked
    _leased: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.outputs = [None] * (len(self.inputs) * self.per_input)
        self.logprobs = [None] * (len(self.inputs) * self.per_input)

    @property
    def scoring(self) -> bool:
        return self.params is None

    @property
    def adapter_key(self) -> Any:
        return self.entry.key

    @property
    def adapter_bytes(self) -> int:
        return self.packed.nbytes

    def input_tokens(self, index: int) -> int:
        return len(self.inputs[index])

    @property
    def per_input(self) -> int:
        """Sequences answered per input: `n` (1 for scoring)."""
        return self.params.n if self.params else 1

    def input_rows(self, index: int) -> int:
        """Decoder rows an input runs on: its beams, or its n sequences (one row each)."""
        return self.params.num_beams * self.params.n if self.params else 1

    @property
    def rows(self) -> int:
        """Decoder rows it runs on (beams and n sequences count one each); a score request's rows."""
        return len(self.inputs) * self.input_rows(0)

    @property
    def tokens(self) -> int:
        """Tokens of its one pass (inputs, and targets for a score request)."""
        return sum(map(len, self.inputs)) + sum(map(len, self.targets or []))

    @property
    def reserved(self) -> int:
        """Cached token positions it may hold at its longest: rows × (input + new tokens)."""
        return sum(self.reserved_by(i) for i in range(len(self.inputs)))

    def reserved_by(self, index: int) -> int:
        """Cached token positions input `index` may hold at its longest (its beams and sequences one row each)."""
        new = self.params.max_new_tokens if self.params else 0
        return self.input_rows(index) * (len(self.inputs[index]) + new)

    def streamed(self, pairs: list[StreamedToken]) -> None:
        """Hand one step's tokens to the stream (engine thread); the stream has `patience_s` again for its next."""
        assert self.stream is not None
        self.deadline = max(self.deadline, time.monotonic() + self.patience_s)
        self.stream.push(pairs)

    def take_lease(self) -> bool:
        """True exactly once: the caller then releases the entry."""
        with self._lock:
            leased, self._leased = self._leased, False
        return leased

    def resolve(self, value: Any) -> None:
        self._settle(lambda f: f.set_result(value))

    def reject(self, error: BaseException) -> None:
        self._settle(lambda f: f.set_exception(error))

    def _settle(self, action: Any) -> None:
        def settle() -> None:
            if not self.future.done():
                action(self.future)

        loop = self.future.get_loop()
        if loop.is_closed():
            return
        loop.call_soon_threadsafe(settle)
