"""The engine before the step loop, kept as the baseline `benchmarks/continuous.py` measures against
(`KRONSERVE_BATCHING=static`): one Hugging Face `generate()` per batch of requests with identical settings,
and nothing joins until it ends. Greedy and beam search only."""

from __future__ import annotations

import time

from .errors import InvalidRequest
from .jobs import Job
from .loop import DecodeLoop


class StaticLoop(DecodeLoop):
    def _turn(self) -> None:
        generate, score = self._take_static()
        if generate:
            self._run_static(generate)
        if score:
            self._score(score)
        self.metrics.queue_depth.set(self.waiting)

    def _take_static(self) -> tuple[list[Job], list[Job]]:
        """Whole requests FIFO: one score pass, and predict requests with the first one's settings while the row and
        pass-token bounds allow."""
        b, now = self.bounds, time.monotonic()
        generate: list[Job] = []
        score: list[Job] = []
        rows = tokens = 0
        with self._cv:
            for job in list(self._waiting):
                if job.cancelled or job.deadline <= now:
                    self._waiting.remove(job)
                    self._drop(job, "queued")
                    continue
                same = generate[0].params if generate else job.params
                fits = rows + job.rows <= b.rows and tokens + job.tokens <= b.pass_tokens
                if job.params is None and not score:
                    score.append(job)
                elif job.params is not None and job.params == same and (not generate or fits):
                    generate.append(job)
                    rows, tokens = rows + job.rows, tokens + job.tokens
                else:
                    continue
                self._waiting.remove(job)
        return generate, score

    def _run_static(self, jobs: list[Job]) -> None:
        p = jobs[0].params
        assert p is not None

        def generate(slots: list[int], inputs: list[list[int]]) -> list[list[int]]:
            if p.sampling or p.logprobs is not None or p.n > 1:
                raise InvalidRequest("sampling (temperature > 0), logprobs or n needs KRONSERVE_BATCHING=continuous")
            return self.engine.generate_ids(slots, inputs, p.max_new_tokens, p.num_beams, p.min_new_tokens)

        self._whole_pass(jobs, "generate", generate, self._answer)
