"""Which waiting requests a step admits: a pure policy over plain numbers, tested without a model.

Two kinds of bound (vLLM's `Scheduler.schedule` and Sarathi-Serve's stall-free batching, for an
encoder-decoder):
- **Capacity** (running rows, cached token positions, the device tier's bytes): what the running batch
  may hold at once. Predict requests are admitted strictly first come first served against these: one
  that does not fit blocks those behind it, so a big request is never starved by small ones.
- **The step's encoder budget** (`step_tokens`): input tokens admitted between two decode steps, so one
  long admission never stalls every running row (7.6× a 2-token request's idle latency before it). A
  request's inputs may be admitted over several steps; T5's encoder is bidirectional, so an input is
  never cut, and an input longer than the budget goes alone. The head of the queue always advances (its
  next input fits a fresh budget, or goes alone); later requests fill what it leaves, in order, so a
  short request behind a long one starts at the next step instead of after the whole long one.
Score requests run as one teacher-forced pass between steps, bounded by `pass_tokens` and rows.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .methods.base import Geometry

# The default step budget is encoder work, not a token count: 512 tokens of t5-small on a CPU (an admission pass of
# about a decode step's length; benchmarks/continuous.py's stall case chose it), as many tokens of another backbone
# as cost the same. A tiny model gets many more tokens (its passes cost their overhead, not their tokens), t5-base
# fewer. On CUDA, where a pass's cost is mostly its launch overhead, 16 times as much (not measured here).
REFERENCE_STEP_TOKENS = 512
CUDA_FACTOR = 16


def encoder_work(g: Geometry) -> int:
    """Multiply-adds per input token of the encoder's projections (attention q, k, v, o and the feed-forward)."""
    d_attn, d_ff = g.d_attn or g.d_model, g.d_ff or 4 * g.d_model
    return g.num_layers * (4 * g.d_model * d_attn + 2 * g.d_model * d_ff)


T5_SMALL_WORK = 6 * (4 * 512 * 512 + 2 * 512 * 2048)


def default_step_tokens(g: Geometry, cuda: bool) -> int:
    """`KRONSERVE_MAX_STEP_TOKENS` when unset: the reference budget's encoder work, in this backbone's tokens."""
    tokens = REFERENCE_STEP_TOKENS * T5_SMALL_WORK // encoder_work(g)
    return max(64, tokens * (CUDA_FACTOR if cuda else 1))


class Pending(Protocol):
    """A waiting request as the policy sees it (`jobs.Job` is one)."""

    cancelled: bool
    failed: bool
    deadline: float
    next_input: int  # inputs before this one were admitted already (a request admitted over several steps)

    @property
    def scoring(self) -> bool: ...

    @property
    def adapter_key(self) -> Hashable: ...

    @property
    def adapter_bytes(self) -> int: ...

    @property
    def tokens(self) -> int:
        """Tokens of its one score pass (inputs and targets)."""
        ...

    @property
    def rows(self) -> int: ...

    def input_tokens(self, index: int) -> int: ...

    def input_rows(self, index: int) -> int: ...

    def reserved_by(self, index: int) -> int: ...

    @property
    def inputs(self) -> Sequence[object]: ...


@dataclass(frozen=True)
class Budget:
    rows: int  # running decoder rows (beams count one each)
    cached_tokens: int  # running rows × (input + new tokens) the caches may reserve
    pass_tokens: int  # tokens of one score pass
    step_tokens: int  # encoder tokens admitted between two decode steps


@dataclass(frozen=True)
class Load:
    """What the running batch holds now."""

    rows: int
    reserved: int


class DeviceRoom:
    """The device budget during one decision: versions already held cost nothing more, a new one its bytes."""

    def __init__(self, held: set, held_bytes: int, budget: int) -> None:
        self.held, self.bytes, self.budget = set(held), held_bytes, budget

    def cost(self, job: Pending) -> int:
        return 0 if job.adapter_key in self.held else job.adapter_bytes

    def fits(self, job: Pending) -> bool:
        return self.bytes + self.cost(job) <= self.budget

    def take(self, job: Pending) -> None:
        self.bytes += self.cost(job)
        self.held.add(job.adapter_key)


@dataclass
class Decisions:
    admit: list[tuple[Pending, int]] = field(default_factory=list)  # (request, how many of its next inputs)
    score: list[Pending] = field(default_factory=list)  # one pass, whole requests
    expired: list[Pending] = field(default_factory=list)  # cancelled, failed or past their deadline: drop


def schedule(waiting: Sequence[Pending], load: Load, budget: Budget, room: DeviceRoom, now: float) -> Decisions:
    """This step's decisions for `waiting` (in arrival order); `room` is updated with what they take."""
    out = Decisions()
    rows, reserved, step = load.rows, load.reserved, 0
    score_rows = score_tokens = 0
    blocked = False  # a predict request did not fit the capacity: nothing behind it may pass it
    for job in waiting:
        if job.cancelled or job.failed or job.deadline <= now:
            out.expired.append(job)
            continue
        if job.scoring:
            first = not out.score
            fits = score_rows + job.rows <= budget.rows and score_tokens + job.tokens <= budget.pass_tokens
            if first or (fits and room.fits(job)):
                room.take(job)
                out.score.append(job)
                score_rows, score_tokens = score_rows + job.rows, score_tokens + job.tokens
            continue
        if blocked:
            continue
        if not room.fits(job) and rows > 0:
            blocked = True
            continue
        count = 0
        for index in range(job.next_input, len(job.inputs)):
            n_rows, n_reserved, tokens = job.input_rows(index), job.reserved_by(index), job.input_tokens(index)
            empty = rows == 0
            if not empty and (rows + n_rows > budget.rows or reserved + n_reserved > budget.cached_tokens):
                blocked = True
                break
            if step + tokens > budget.step_tokens and step > 0:
                break  # the step's encoder budget is spent: the rest waits for the next step
            rows, reserved, step, count = rows + n_rows, reserved + n_reserved, step + tokens, count + 1
        if count:
            room.take(job)
            out.admit.append((job, count))
        if step >= budget.step_tokens:
            break
    return out
