"""Choosing the next token of every running sequence: vocabulary limit, min tokens, greedy, seeded sampling, beams.

A *sequence* is one input of one request in the running batch; it owns `rows` consecutive decoder rows
(1, or `num_beams` for beam search). Each decode step hands every sequence its rows' logits; the
sequence picks its tokens, says whether it is done and, for beams, how its rows' caches are reordered.
Nothing a sequence does depends on its neighbours, so its tokens are the same in any batch:
- the logits of ids the tokenizer cannot decode (past `len(tokenizer)`: real t5-small has 28, the
  offline demo backbone 31,744) are -inf before anything else, so such an id is never produced;
- greedy and `min_new_tokens` follow Hugging Face's `generate` (EOS at -inf until the minimum);
- sampling (temperature, then top-k, then top-p, as HF orders its warpers) draws from a generator
  of the sequence's own, seeded by the request, so a seed reproduces the same tokens alone or mixed;
- beam search is Hugging Face's vectorized beam search (`GenerationMixin._beam_search`, transformers
  5.x) for a batch of one, with the model's `length_penalty` and `early_stopping`.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import torch

from .messages import GenerationParams, TokenIds

NEG = -1.0e9  # HF's "never pick this beam" score


@dataclass(frozen=True)
class Vocabulary:
    """What every sequence's token choice needs to know about the backbone."""

    size: int  # ids the tokenizer can decode; logits past it are masked
    eos: int
    start: int  # decoder start token (T5: the pad id)
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits [R, V] with ids past the tokenizer's vocabulary at -inf (in place)."""
        if logits.shape[-1] > self.size:
            logits[:, self.size :] = -math.inf
        return logits


@dataclass
class Choice:
    tokens: list[int]  # the next decoder input of each of the sequence's rows
    order: list[int] | None = None  # beams: which of its rows each row's cache now continues (None: unchanged)


class Sequence:
    """One greedy or sampled input: one decoder row."""

    rows = 1

    def __init__(self, params: GenerationParams, vocab: Vocabulary, device: torch.device, choice: int = 0) -> None:
        """`choice`: which of an input's n sequences this is; a seeded request's j-th draws with seed + j."""
        self.params, self.vocab = params, vocab
        self.tokens: list[int] = []
        self.logprobs: list[TokenIds] | None = None if params.logprobs is None else []  # one per token, when asked
        self.done = False
        self._generator: torch.Generator | None = None
        if params.sampling:
            seed = params.seed + choice if params.seed is not None else secrets.randbits(63)
            self._generator = torch.Generator(device=device).manual_seed(seed)

    def choose(self, logits: torch.Tensor) -> Choice:
        """Raw logits [1, V] (a float32 copy this may change) -> this step's token."""
        self.vocab.mask(logits)
        if len(self.tokens) < self.params.min_new_tokens:
            logits[:, self.vocab.eos] = -math.inf
        token = int(logits[0].argmax()) if self._generator is None else self._sample(logits[0])
        return self.take(token)

    def output(self) -> list[int]:
        return self.tokens

    def take(self, token: int) -> Choice:
        self.tokens.append(token)
        self.done = token == self.vocab.eos or len(self.tokens) >= self.params.max_new_tokens
        return Choice([token])

    def _sample(self, logits: torch.Tensor) -> int:
        p = self.params
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[-1]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, -math.inf)
        if p.top_p < 1.0:
            # HF's TopPLogitsWarper: drop the low tail whose mass is at most 1 - top_p, keep at least one id.
            ordered, index = torch.sort(logits, descending=False)
            tail = ordered.softmax(-1).cumsum(-1) <= 1 - p.top_p
            tail[-1] = False
            logits = logits.masked_fill(tail.scatter(0, index, tail), -math.inf)
        probs = logits.softmax(-1)
        if not bool(torch.isfinite(probs).all()):  # every logit -inf or overflowed: the most likely id stands
            return int(logits.argmax())
        return int(torch.multinomial(probs, 1, generator=self._generator))


def record_logprobs(logits: torch.Tensor, tokens: list[int], sequences: list[Sequence]) -> None:
    """Append each sequence's chosen token's log-probability and its `params.logprobs` best alternatives, from its
    row's raw logits [R, V] (one log-softmax and one top-k for all of them, one copy to the host)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    chosen = logp.gather(1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    k = max(s.params.logprobs or 0 for s in sequences)
    values, ids = logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long())
    values, ids = values.tolist(), ids.tolist()
    for i, s in enumerate(sequences):
        n = s.params.logprobs or 0
        assert s.logprobs is not None
        s.logprobs.append((chosen[i], list(zip(ids[i][:n], values[i][:n], strict=True))))


def greedy_tokens(logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
    """The greedy choice of many one-row sequences at once (one argmax, one copy to the host)."""
    vocab = sequences[0].vocab
    vocab.mask(logits)
    eos = vocab.eos
    early = [i for i, s in enumerate(sequences) if len(s.tokens) < s.params.min_new_tokens]
    if early:
        logits[early, eos] = -math.inf
    return logits.argmax(-1).tolist()


@dataclass
class _Beams:
    """The running and finished hypotheses of one input (HF's tensors for batch size 1)."""

    running: torch.Tensor  # [m, max_len] token ids, column 0 the start token
    running_scores: torch.Tensor  # [m]
    finished: torch.Tensor  # [m, max_len]
    finished_scores: torch.Tensor  # [m]
    finished_lengths: torch.Tensor  # [m] generated tokens of each finished hypothesis
    is_finished: torch.Tensor  # [m] bool
    improvable: bool = True
    cur_len: int = 1
    top_mask: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))


class BeamSequence:
    """One input decoded by beam search over `num_beams` contiguous rows."""

    def __init__(self, params: GenerationParams, vocab: Vocabulary) -> None:
        self.params, self.vocab = params, vocab
        m, max_len = params.num_beams, params.max_new_tokens + 1
        self.rows = m
        self.done = False
        running = torch.full((m, max_len), vocab.eos, dtype=torch.long)  # HF fills with `pad or eos`: T5's pad is 0
        running[:, 0] = vocab.start
        scores = torch.zeros(m)
        scores[1:] = NEG  # only the first beam's candidates count at the first step
        top_mask = torch.cat([torch.ones(m, dtype=torch.bool), torch.zeros(m, dtype=torch.bool)])
        self._b = _Beams(
            running,
            scores,
            running.clone(),
            torch.full((m,), NEG),
            torch.zeros(m, dtype=torch.long),
            torch.zeros(m, dtype=torch.bool),
            top_mask=top_mask,
        )

    def choose(self, logits: torch.Tensor) -> Choice:
        """Raw logits [m, V] (float32) -> each row's next token and the rows they continue.

        As in HF, the vocabulary and min-token masks act on the log-probabilities (a processor after log_softmax).
        """
        b, m, vocab = self._b, self.rows, self.vocab
        log_probs = vocab.mask(torch.log_softmax(logits.cpu(), dim=-1))
        if b.cur_len - 1 < self.params.min_new_tokens:
            log_probs[:, vocab.eos] = -math.inf
        size = log_probs.shape[-1]
        flat = (log_probs + b.running_scores[:, None]).reshape(-1)
        top_scores, top_index = torch.topk(flat, 2 * m)
        source, tokens = top_index // size, top_index % size
        candidates = b.running[source].clone()
        candidates[:, b.cur_len] = tokens
        hits = (tokens == vocab.eos) | (b.cur_len + 1 >= b.running.shape[1])

        live_scores = top_scores + hits.float() * NEG
        keep = torch.topk(live_scores, m).indices
        b.running, b.running_scores = candidates[keep], live_scores[keep]
        self._finish(candidates, top_scores, hits)
        b.cur_len += 1
        self._update_improvable()
        all_finished = bool(b.is_finished.all()) and vocab.early_stopping is True
        self.done = not b.improvable or all_finished or bool(hits.all())
        return Choice(candidates[keep, b.cur_len - 1].tolist(), source[keep].tolist())

    def output(self) -> list[int]:
        b = self._b
        return b.finished[0, 1 : 1 + int(b.finished_lengths[0])].tolist()

    def _finish(self, candidates: torch.Tensor, top_scores: torch.Tensor, hits: torch.Tensor) -> None:
        """HF `_update_finished_beams`: the best `num_beams` of the old finished and the just-finished top ones."""
        b = self._b
        just = hits & b.top_mask
        scores = top_scores / (b.cur_len**self.vocab.length_penalty)
        if bool(b.is_finished.all()) and self.vocab.early_stopping is True:
            scores = scores + NEG
        if not b.improvable:
            scores = scores + NEG
        scores = scores + (~just).float() * NEG
        merged_scores = torch.cat([b.finished_scores, scores])
        pick = torch.topk(merged_scores, self.rows).indices
        lengths = torch.full((scores.shape[0],), b.cur_len, dtype=torch.long)
        b.finished = torch.cat([b.finished, candidates])[pick]
        b.finished_scores = merged_scores[pick]
        b.finished_lengths = torch.cat([b.finished_lengths, lengths])[pick]
        b.is_finished = torch.cat([b.is_finished, just])[pick]

    def _update_improvable(self) -> None:
        """HF `_check_early_stop_heuristic` (the best running score, at the best length it can still reach)."""
        b, vocab = self._b, self.vocab
        if vocab.early_stopping == "never" and vocab.length_penalty > 0:
            best_len = b.running.shape[1] - 1
        else:
            best_len = b.cur_len - 1
        best_running = float(b.running_scores[0]) / (best_len**vocab.length_penalty)
        worst = torch.where(b.is_finished, b.finished_scores.min(), torch.tensor(NEG))
        b.improvable = b.improvable and bool((best_running > worst).any())
