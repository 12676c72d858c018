"""Which waiting requests a step admits: a pure policy over plain numbers, tested without a model.

Two kinds of bound (vLLM's `Scheduler.schedule` and Sarathi-Serve's stall-free batching, for an
encoder-decoder):
- **Capacity** (running rows, cached token positions, the device tier's bytes): what the running batch
  may hold at once. A request that does not fit blocks those behind it, so a big one is never starved.
- **The step's encoder budget** (`step_tokens`): the work of one admission pass, counted as an encoder
  pass costs, inputs × the longest input (padding), so one long admission never stalls the running rows
  (7.6× a 2-token request's idle latency before). A request's inputs may be admitted over several steps;
  T5's encoder is bidirectional, so an input is never cut, and one longer than the budget goes alone.
  While rows run, the whole pass stays within the budget. On an idle batch a request not started yet may
  take a budget of its own and the pass up to `pass_tokens`: a burst of short requests is one pass.
Order within a step: a started request passed over at the last step first (so none waits two steps in a
row), then requests not started yet (a short request behind a long one starts at the next step, in a pass
of its own size), then the other started ones; arrival order within each.
Score requests run as one teacher-forced pass between steps, bounded by `pass_tokens` and rows.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from .methods.base import Geometry

# The default step budget is encoder work, not a token count: 256 tokens of t5-small on a CPU (one 200-token input's
# pass, ~70 ms; benchmarks/continuous.py's stall case chose it), as many tokens of another backbone
# as cost the same. A tiny model gets many more tokens (its passes cost their overhead, not their tokens), t5-base
# fewer. On CUDA, where a pass's cost is mostly its launch overhead, 16 times as much (not measured here).
REFERENCE_STEP_TOKENS = 256
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
    stalled: bool  # started, and passed over at the last step

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
    pass_tokens: int  # tokens of one score pass; of one admission pass on an idle batch
    step_tokens: int  # padded encoder tokens admitted between two decode steps


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
    live: list[Pending] = []
    score_rows = score_tokens = 0
    for job in waiting:
        if job.cancelled or job.failed or job.deadline <= now:
            out.expired.append(job)
        elif not job.scoring:
            live.append(job)
        elif not out.score or (
            score_rows + job.rows <= budget.rows and score_tokens + job.tokens <= budget.pass_tokens and room.fits(job)
        ):
            room.take(job)
            out.score.append(job)
            score_rows, score_tokens = score_rows + job.rows, score_tokens + job.tokens
    _admit(sorted(live, key=_priority), load, budget, room, out)
    return out


def _priority(job: Pending) -> int:
    """A started request passed over last step first (it never waits two steps running), then requests not started
    yet, then the other started ones; arrival order within each (the sort is stable)."""
    if job.next_input > 0:
        return 0 if job.stalled else 2
    return 1


class _Pass:
    """The admission pass being filled: an encoder pass costs its inputs × its longest input (padding)."""

    def __init__(self, load: Load) -> None:
        self.rows, self.reserved = load.rows, load.reserved
        self.busy = load.rows > 0
        self.inputs = self.longest = 0

    def cost_with(self, tokens: int) -> int:
        return (self.inputs + 1) * max(self.longest, tokens)

    def add(self, rows: int, reserved: int, tokens: int) -> None:
        self.rows, self.reserved = self.rows + rows, self.reserved + reserved
        self.inputs, self.longest = self.inputs + 1, max(self.longest, tokens)


def _admit(ordered: list[Pending], load: Load, budget: Budget, room: DeviceRoom, out: Decisions) -> None:
    """Fill one admission pass from `ordered`; the first input always goes (one over the budget alone)."""
    filling = _Pass(load)
    for job in ordered:
        if not room.fits(job) and filling.rows > 0:
            return  # capacity is first come first served: nothing passes a request that does not fit
        count, blocked = _inputs_of(job, filling, budget)
        if count:
            room.take(job)
            out.admit.append((job, count))
        if blocked:
            return


def _inputs_of(job: Pending, filling: _Pass, budget: Budget) -> tuple[int, bool]:
    """How many of `job`'s next inputs join the pass, and whether the capacity stopped it (blocking the rest)."""
    own = count = 0
    for index in range(job.next_input, len(job.inputs)):
        tokens, rows, reserved = job.input_tokens(index), job.input_rows(index), job.reserved_by(index)
        if filling.rows > 0 and (
            filling.rows + rows > budget.rows or filling.reserved + reserved > budget.cached_tokens
        ):
            return count, True
        if filling.inputs > 0 and not _within_budget(filling, job, own + tokens, tokens, budget):
            break
        filling.add(rows, reserved, tokens)
        own, count = own + tokens, count + 1
    return count, False


def _within_budget(filling: _Pass, job: Pending, own: int, tokens: int, budget: Budget) -> bool:
    """With rows running (their decode steps to protect) the whole pass costs at most `step_tokens`. On an idle batch
    a request not started yet may take `step_tokens` of its own and the pass up to `pass_tokens`, so a burst of short
    requests is one pass while a long request is still admitted in slices."""
    cost = filling.cost_with(tokens)
    if filling.busy or job.next_input > 0:
        return cost <= budget.step_tokens
    return cost <= budget.pass_tokens and own <= budget.step_tokens
