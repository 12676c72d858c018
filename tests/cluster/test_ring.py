"""The ring's contract: rendezvous order, minimal movement when a replica leaves, balance, bounded-load spill."""

from __future__ import annotations

from collections import Counter

import pytest

from kronserve.cluster.ring import Ring

TASKS = [f"task-{i}" for i in range(2000)]


def test_order_is_a_fixed_permutation_of_the_replicas() -> None:
    ring = Ring(["r0", "r1", "r2"])
    for task in TASKS[:50]:
        order = ring.order(task)
        assert sorted(order) == ["r0", "r1", "r2"]
        assert Ring(["r2", "r0", "r1"]).order(task) == order  # the listing order does not matter
        assert ring.owner(task) == order[0]


def test_a_leaving_replica_moves_only_its_own_tasks_to_their_next_choice() -> None:
    full, without = Ring(["r0", "r1", "r2", "r3"]), Ring(["r0", "r1", "r3"])
    moved = 0
    for task in TASKS:
        before = full.order(task)
        if before[0] == "r2":
            assert without.owner(task) == before[1]
            moved += 1
        else:
            assert without.owner(task) == before[0]
    assert moved == sum(full.owner(t) == "r2" for t in TASKS) > 0


def test_tasks_spread_evenly_over_the_replicas() -> None:
    owners = Counter(Ring([f"r{i}" for i in range(4)]).owner(t) for t in TASKS)
    assert set(owners) == {"r0", "r1", "r2", "r3"}
    assert all(abs(n - len(TASKS) / 4) < 0.15 * len(TASKS) / 4 for n in owners.values()), owners


def test_choose_keeps_light_traffic_on_the_owner_and_spills_past_the_bound() -> None:
    ring = Ring(["r0", "r1", "r2"], epsilon=0.25, floor=4)
    task = TASKS[0]
    owner, second, third = ring.order(task)
    up = {owner: True, second: True, third: True}
    assert ring.choose(task, up, {owner: 3}) == [owner, second, third]  # under the floor: the owner first
    # 30 in flight on the owner, 0 elsewhere: bound = max(4, 1.25 * 31 / 3) ~ 12.9, the owner is past it
    assert ring.choose(task, up, {owner: 30}) == [second, third, owner]
    assert ring.choose(task, {**up, owner: False}, {}) == [second, third]  # a down replica is not tried
    assert ring.choose(task, {}, {}) == [owner, second, third]  # none known up: try them all, in order


def test_a_ring_needs_a_replica() -> None:
    with pytest.raises(ValueError, match="at least one replica"):
        Ring([])
