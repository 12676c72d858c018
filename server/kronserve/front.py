"""The text side of a request: tokenize, run on a token-level engine, detokenize (incrementally when streaming).

The API process runs this over the engine process's client; the in-process `Service` (cluster replicas,
benchmarks) runs the same over its own scheduler, so both answer alike. A `Run` is one accepted request
seen from here: its first event, its tokens per step, its values, and the two ways to end it early.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from .errors import KronserveError
from .messages import (
    Delta,
    Generation,
    GenerationParams,
    Output,
    Prompt,
    Result,
    Started,
    StreamedToken,
    TokenLogprob,
)
from .store import VersionRef
from .streaming import StreamText
from .text import TextCodec

log = logging.getLogger(__name__)
# Inputs longer than this many characters in all are tokenized off the event loop (shorter ones cost less
# than the thread hop).
INLINE_CHARS = 4096


class Run(Protocol):
    """One accepted request. `started` is known once `tokens` or `result` has answered (at once for streams)."""

    started: Started

    async def tokens(self) -> list[StreamedToken] | None:
        """The next (input index, token) pairs picked, in order; None once the request has ended."""
        ...

    async def result(self) -> list[Any]:
        """Its values: `Output`s (predict) or float scores; raises the request's error."""
        ...

    def stop(self, index: int) -> None:
        """End input `index` at the next step with what it has (a stop string appeared)."""
        ...

    def cancel(self) -> None:
        """The caller gave up (no-op once ended): its rows leave the engine at the next step."""
        ...


class TextFront:
    """`predict`, `predict_stream` and `score` of the `Backend` protocol, over `_run` and `codec`."""

    async def open_run(
        self,
        task: str,
        inputs: list[list[int]],
        targets: list[list[int]] | None,
        params: GenerationParams | None,
        pin: VersionRef | None,
        stream: bool,
    ) -> Run:
        """Accept one request (refusals raise here, before any byte of an answer is sent)."""
        raise NotImplementedError

    @property
    def codec(self) -> TextCodec:
        raise NotImplementedError

    async def predict(
        self, task: str, inputs: list[Prompt], params: GenerationParams, pin: VersionRef | None = None
    ) -> Result:
        if params.stop:  # stop strings are found in the text as it comes: the stream's path
            events = [e async for e in self.predict_stream(task, inputs, params, pin)]
            return events[-1]
        codec = self.codec
        run = await self.open_run(task, await self._tokenize(inputs), None, params, pin, stream=False)
        outputs = await run.result()
        s = run.started
        return Result(s.task, s.version, [_generation(codec, o) for o in outputs], s.replica)

    async def predict_stream(
        self, task: str, inputs: list[Prompt], params: GenerationParams, pin: VersionRef | None = None
    ) -> AsyncIterator[Started | Delta | Result]:
        """`Started`, text deltas per input as tokens are decoded, then the `Result` (its texts are the deltas' sums).

        `Started` comes with the first tokens: whatever ends the request before them (a full queue, a timeout
        while queued, an adapter that cannot be read) raises before the first event, as `predict` does, so the
        API answers it with the same status and headers. Leaving the iteration early (a client gone) cancels the
        request: its rows leave the engine at the next step.
        """
        codec = self.codec
        ids = await self._tokenize(inputs)
        run = await self.open_run(task, ids, None, params, pin, stream=True)
        answers = len(ids) * params.n  # input i's j-th sequence is answer i*n+j (its deltas' index)
        text = StreamText(codec.decode, answers, params.stop, params.include_stop)
        prompt, generated = sum(map(len, ids)), 0
        # With logprobs: each answer's tokens not yet sent with a delta (text held back sends them with a later one).
        pending: list[list[TokenLogprob]] | None = None if params.logprobs is None else [[] for _ in range(answers)]
        try:
            pairs = await run.tokens()
            if pairs is None:
                await run.result()  # ended before its first token: its error raises here
            yield run.started
            while pairs is not None:
                generated += len(pairs)
                for index, token, *logprob in pairs:
                    delta, stopped = text.add(index, token)
                    if stopped:
                        run.stop(index)
                    if pending is not None:
                        pending[index] += codec.logprobs([token], [logprob])  # type: ignore[list-item]
                    if delta:
                        yield Delta(index, delta, prompt, generated, _taken(pending, index))
                pairs = await run.tokens()
            finals = []
            outputs = await run.result()
            generated = sum(len(o.ids) for o in outputs)
            for i, output in enumerate(outputs):
                delta, final = text.finish(i, _generation(codec, output))
                if delta or (pending and pending[i]):
                    yield Delta(i, delta, prompt, generated, _taken(pending, i))
                finals.append(final)
            s = run.started
            yield Result(s.task, s.version, finals, s.replica)
        finally:
            run.cancel()

    async def score(self, task: str, inputs: list[str], targets: list[str], pin: VersionRef | None = None) -> Result:
        ids, target_ids = await self._tokenize(inputs), await self._tokenize(targets, "target")
        run = await self.open_run(task, ids, target_ids, None, pin, stream=False)
        values = await run.result()
        s = run.started
        return Result(s.task, s.version, values, s.replica)

    async def _tokenize(self, texts: list[Prompt] | list[str], what: str = "input") -> list[list[int]]:
        """Token ids of each input; an input given as ids (an OpenAI token-id prompt) is checked, not tokenized."""
        if any(not isinstance(t, str) for t in texts):
            return self.codec.checked_ids(texts, what)
        if sum(map(len, texts)) <= INLINE_CHARS:
            return self.codec.tokenize(texts, what)
        return await asyncio.to_thread(self.codec.tokenize, texts, what)


def _generation(codec: TextCodec, output: Output) -> Generation:
    """One input's text; a sequence that cannot be decoded fails its own request only."""
    try:
        text = codec.decode(output.ids)
        logprobs = None if output.logprobs is None else codec.logprobs(output.ids, output.logprobs)
    except Exception as e:
        log.error("an output could not be decoded: %s", e)
        raise KronserveError(f"the generated tokens could not be decoded: {e}") from e
    return Generation(text, len(output.ids), output.prompt_tokens, output.finish_reason, logprobs)


def _taken(pending: list[list[TokenLogprob]] | None, index: int) -> list[TokenLogprob] | None:
    if pending is None:
        return None
    taken, pending[index] = pending[index], []
    return taken
