"""Which replica serves a task: rendezvous (highest-random-weight) hashing with a bounded-load spill.

Every task has a fixed preference order over the replicas, so a task's rows land on one replica and
each replica still gets many tasks (mixed batches); removing a replica moves only its own tasks, each
to its next choice. Under load a task spills to its next choice once its owner carries more than
(1 + epsilon) times the mean load (Mirrokni et al., "Consistent Hashing with Bounded Loads"), and never
below `floor` requests in flight, so light traffic always stays on the owner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence


def _weight(replica: str, task: str) -> int:
    digest = hashlib.blake2b(f"{replica}\x00{task}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


class Ring:
    def __init__(self, replicas: Sequence[str], epsilon: float = 0.25, floor: int = 64) -> None:
        if not replicas:
            raise ValueError("a ring needs at least one replica")
        self.replicas = list(replicas)
        self.epsilon, self.floor = epsilon, floor

    def order(self, task: str) -> list[str]:
        """The task's replicas, most preferred first (the same on every gateway)."""
        return sorted(self.replicas, key=lambda r: _weight(r, task), reverse=True)

    def owner(self, task: str) -> str:
        return self.order(task)[0]

    def choose(self, task: str, up: Mapping[str, bool], load: Mapping[str, int]) -> list[str]:
        """Replicas to try, in order: live ones within the load bound first, then the other live ones."""
        live = [r for r in self.order(task) if up.get(r, False)] or self.order(task)
        total = sum(load.get(r, 0) for r in live)
        bound = max(self.floor, (1 + self.epsilon) * (total + 1) / len(live))
        within = [r for r in live if load.get(r, 0) < bound]
        return within + [r for r in live if r not in within]
