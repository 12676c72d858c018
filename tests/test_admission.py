"""The admission policy alone (no model): what one step admits under the capacity bounds and the step's
encoder-token budget, and that a short request behind a long one is not stalled by it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from kronserve.admission import Budget, DeviceRoom, Load, schedule

BUDGET = Budget(rows=64, cached_tokens=100_000, pass_tokens=1000, step_tokens=256)
IDLE, BUSY = Load(0, 0), Load(1, 0)


@dataclass(eq=False)
class Ask:
    lengths: list[int]
    beams: int = 1
    new_tokens: int = 2
    score: bool = False
    key: str = "t"
    nbytes: int = 10
    cancelled: bool = False
    failed: bool = False
    deadline: float = 1e9
    next_input: int = 0
    stalled: bool = False

    @property
    def inputs(self) -> list[list[int]]:
        return [[0] * n for n in self.lengths]

    @property
    def scoring(self) -> bool:
        return self.score

    @property
    def adapter_key(self) -> str:
        return self.key

    @property
    def adapter_bytes(self) -> int:
        return self.nbytes

    @property
    def tokens(self) -> int:
        return sum(self.lengths)

    @property
    def rows(self) -> int:
        return len(self.lengths) * self.beams

    def input_tokens(self, index: int) -> int:
        return self.lengths[index]

    def input_rows(self, index: int) -> int:
        return self.beams

    def reserved_by(self, index: int) -> int:
        return self.beams * (self.lengths[index] + self.new_tokens)


def decide(waiting: list[Ask], load: Load = IDLE, budget: Budget = BUDGET, room: DeviceRoom | None = None):
    return schedule(waiting, load, budget, room or DeviceRoom(set(), 0, 10**9), now=0.0)


def admitted(decided) -> list[tuple[Ask, int]]:
    return list(decided.admit)


def test_a_long_request_is_admitted_a_slice_a_step_and_a_short_one_behind_it_starts_at_the_next_alone():
    long, short = Ask([200] * 16), Ask([5])
    assert admitted(decide([long])) == [(long, 1)]  # a second 200-token input would take it past its 256
    long.next_input = 1
    # The short one arrived meanwhile: it goes first, and alone: the long one's next input beside it would pad the
    # pass to 2 × 200 tokens.
    assert admitted(decide([long, short], BUSY)) == [(short, 1)]
    long.stalled = True  # passed over: it goes first at the next step, whatever arrived meanwhile
    assert admitted(decide([long, Ask([5])], BUSY)) == [(long, 1)]


def test_while_rows_run_a_pass_costs_its_inputs_times_its_longest_input_within_the_budget():
    a, b, c = Ask([100]), Ask([10]), Ask([10])
    assert admitted(decide([a, b, c], BUSY)) == [(a, 1), (b, 1)]  # 3 × 100 padded tokens > 256
    shorts = [Ask([40]) for _ in range(8)]
    assert admitted(decide(shorts, BUSY)) == [(s, 1) for s in shorts[:6]]  # 6 × 40 = 240


def test_a_burst_of_short_requests_on_an_idle_batch_is_one_pass():
    burst = [Ask([30]) for _ in range(32)]  # 960 padded tokens: over the step budget, within the pass's
    assert admitted(decide(burst)) == [(a, 1) for a in burst]
    many = Ask([30] * 20)  # one request still takes only its own budget: 8 × 30 = 240
    assert admitted(decide([many])) == [(many, 8)]


def test_an_input_longer_than_the_budget_goes_alone():
    huge, small = Ask([2000]), Ask([3])
    assert admitted(decide([huge, small])) == [(huge, 1)]
    assert admitted(decide([huge, small], BUSY)) == [(huge, 1)]


def test_a_started_request_never_waits_two_steps_in_a_row_under_a_stream_of_new_ones():
    long = Ask([200] * 6)
    progress = []
    for step in range(12):
        decided = decide([long, Ask([5]), Ask([5])], IDLE if step == 0 else BUSY)
        took = dict((id(a), n) for a, n in decided.admit).get(id(long), 0)
        progress.append(took)
        long.next_input += took
        long.stalled = long.next_input > 0 and not took
        if long.next_input == len(long.lengths):
            break
    assert long.next_input == 6
    assert all(a or b for a, b in itertools.pairwise(progress))  # never two steps without progress


def test_capacity_is_strict_fifo_a_request_that_does_not_fit_blocks_those_behind_it():
    running = Load(rows=60, reserved=0)
    big, small = Ask([5] * 8), Ask([5])  # 8 rows do not fit beside 60 of 64; 1 row would
    assert admitted(decide([big, small], load=running)) == [(big, 4)]  # as many of its inputs as fit; none passes it
    beams = Ask([5], beams=8)
    assert decide([beams, small], load=running).admit == []


def test_an_empty_batch_takes_a_request_larger_than_every_capacity_bound():
    alone = Ask([5] * 100)
    decided = decide([alone], budget=Budget(rows=4, cached_tokens=10, pass_tokens=10**6, step_tokens=10**6))
    assert admitted(decided) == [(alone, 1)]  # the first row goes in alone; the rest wait for room


def test_the_device_room_counts_a_new_adapter_once_and_blocks_what_does_not_fit():
    room = DeviceRoom({"held"}, held_bytes=80, budget=100)
    a1, a2, b, held = (
        Ask([5], key="a", nbytes=20),
        Ask([5], key="a", nbytes=20),
        Ask([5], key="b"),
        Ask([5], key="held"),
    )
    decided = decide([a1, a2, b, held], load=BUSY, room=room)
    assert [a for a, _ in decided.admit] == [a1, a2]  # "a" costs 20 once; "b" no longer fits and blocks "held"
    assert room.bytes == 100


def test_cancelled_failed_and_expired_requests_are_dropped_not_admitted():
    gone = [Ask([5], cancelled=True), Ask([5], failed=True), Ask([5], deadline=-1.0)]
    live = Ask([5])
    decided = decide([*gone, live])
    assert decided.expired == gone and [a for a, _ in decided.admit] == [live]


def test_score_requests_form_one_pass_within_their_own_bounds_beside_admissions():
    s1, s2, s3 = Ask([400], score=True), Ask([700], score=True), Ask([200], score=True)
    p = Ask([5])
    decided = decide([s1, p, s2, s3])
    assert decided.score == [s1, s3]  # s2 would take the pass past 1000 tokens; s3 still fits
    assert [a for a, _ in decided.admit] == [p]
    assert decide([Ask([5000], score=True)]).score  # the first score request always runs, however large


def test_the_default_step_budget_is_t5_small_256_tokens_of_encoder_work_in_any_backbones_tokens():
    from kronserve.admission import default_step_tokens
    from kronserve.methods.base import Geometry

    small, base = Geometry(512, 6, 6, 2048, 512), Geometry(768, 12, 12, 3072, 768)
    tiny = Geometry(128, 2, 2, 256, 128)
    assert default_step_tokens(small, cuda=False) == 256
    assert default_step_tokens(base, cuda=False) == 64  # 85M multiply-adds a token against 19M: 56, the floor
    assert default_step_tokens(tiny, cuda=False) == 18432  # a tiny model's passes cost their overhead
    assert default_step_tokens(small, cuda=True) == 16 * 256
