"""The admission policy alone (no model): what one step admits under the capacity bounds and the step's
encoder-token budget, and that a short request behind a long one is not stalled by it."""

from __future__ import annotations

from dataclasses import dataclass

from kronserve.admission import Budget, DeviceRoom, Load, schedule

BUDGET = Budget(rows=64, cached_tokens=100_000, pass_tokens=1000, step_tokens=512)


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


def decide(waiting: list[Ask], load: Load = Load(0, 0), budget: Budget = BUDGET, room: DeviceRoom | None = None):
    return schedule(waiting, load, budget, room or DeviceRoom(set(), 0, 10**9), now=0.0)


def steps(waiting: list[Ask], budget: Budget = BUDGET) -> list[list[tuple[int, int]]]:
    """Every step's admissions as (request number, inputs), advancing cursors as the loop does, until all are in."""
    out = []
    while any(a.next_input < len(a.lengths) for a in waiting):
        decided = decide([a for a in waiting if a.next_input < len(a.lengths)], budget=budget)
        out.append([(waiting.index(a), n) for a, n in decided.admit])
        for a, n in decided.admit:
            a.next_input += n
    return out


def test_a_long_request_is_admitted_over_several_steps_and_a_short_one_behind_it_at_the_next():
    long, short = Ask([200] * 16), Ask([5])
    first = decide([long])
    assert [(a, n) for a, n in first.admit] == [(long, 2)]  # 400 of 512 tokens; a third input would exceed it
    long.next_input = 2
    second = decide([long, short])  # the short one arrived meanwhile: it rides in the budget the long one leaves
    assert [(a, n) for a, n in second.admit] == [(long, 2), (short, 1)]


def test_every_step_stays_within_the_budget_and_the_head_always_advances():
    waiting = [Ask([300, 300, 300]), Ask([100] * 5), Ask([600]), Ask([10])]
    for step in steps(waiting):
        tokens = [waiting[i].lengths[0] * n for i, n in step]  # each request's inputs have one length here
        assert sum(tokens) <= BUDGET.step_tokens or len(step) == 1  # over budget only an input alone
        assert step  # something is admitted at every step
    admitted_order = [i for step in steps([Ask([300, 300]), Ask([5])]) for i, _ in step]
    assert admitted_order[0] == 0  # first come is first served


def test_an_input_longer_than_the_budget_goes_alone():
    huge, small = Ask([2000]), Ask([3])
    decided = decide([huge, small])
    assert [(a, n) for a, n in decided.admit] == [(huge, 1)]


def test_capacity_is_strict_fifo_a_request_that_does_not_fit_blocks_those_behind_it():
    running = Load(rows=60, reserved=0)
    big, small = Ask([5] * 8), Ask([5])  # 8 rows do not fit beside 60 of 64; 1 row would
    decided = decide([big, small], load=running)
    assert [(a, n) for a, n in decided.admit] == [(big, 4)]  # as many of its inputs as fit; nothing passes it
    beams = Ask([5], beams=8)
    assert decide([beams, small], load=running).admit == []


def test_an_empty_batch_takes_a_request_larger_than_every_capacity_bound():
    alone = Ask([5] * 100)
    decided = decide([alone], budget=Budget(rows=4, cached_tokens=10, pass_tokens=10, step_tokens=10**6))
    assert [(a, n) for a, n in decided.admit] == [(alone, 1)]  # the first row goes in alone; the rest wait for room


def test_the_device_room_counts_a_new_adapter_once_and_blocks_what_does_not_fit():
    room = DeviceRoom({"held"}, held_bytes=80, budget=100)
    a1, a2, b, held = (
        Ask([5], key="a", nbytes=20),
        Ask([5], key="a", nbytes=20),
        Ask([5], key="b"),
        Ask([5], key="held"),
    )
    decided = decide([a1, a2, b, held], load=Load(1, 0), room=room)
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


def test_the_default_step_budget_is_t5_small_512_tokens_of_encoder_work_in_any_backbones_tokens():
    from kronserve.admission import default_step_tokens
    from kronserve.methods.base import Geometry

    small, base = Geometry(512, 6, 6, 2048, 512), Geometry(768, 12, 12, 3072, 768)
    tiny = Geometry(128, 2, 2, 256, 128)
    assert default_step_tokens(small, cuda=False) == 512
    assert default_step_tokens(base, cuda=False) == 113  # 85M multiply-adds a token against t5-small's 19M
    assert default_step_tokens(tiny, cuda=False) == 36864  # a tiny model's passes cost their overhead: no stall
    assert default_step_tokens(small, cuda=True) == 16 * 512
