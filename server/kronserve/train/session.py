"""The routed backbone with a trainable plan: batches, the loss, greedy outputs, evaluation."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..backbone import Backbone
from ..t5_sites import SiteRouter
from .data import Example, chunks
from .trainable import TrainablePlan

IGNORE = -100  # label of right padding: cross-entropy skips it


@dataclass(frozen=True)
class Batch:
    inputs: dict[str, torch.Tensor]
    decoder_input_ids: torch.Tensor
    labels: torch.Tensor  # IGNORE on right padding


@dataclass
class Session:
    """The routed backbone and the plan that trains on it: what every step and every evaluation needs."""

    backbone: Backbone
    router: SiteRouter
    plan: TrainablePlan

    def encode(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        enc = self.backbone.tokenizer(list(texts), return_tensors="pt", padding=True)
        return {k: v.to(self.backbone.device) for k, v in enc.items()}

    def batch(self, examples: Sequence[Example]) -> Batch:
        """Teacher forcing as `Engine.score` does it: targets with EOS, shifted right behind the start token."""
        lab = self.encode([e.target for e in examples])
        ids = lab["input_ids"]
        start = torch.full_like(ids[:, :1], self.backbone.model.config.decoder_start_token_id)
        labels = ids.masked_fill(lab["attention_mask"] == 0, IGNORE)
        return Batch(self.encode([e.input for e in examples]), torch.cat([start, ids[:, :-1]], dim=1), labels)

    def token_losses(self, batch: Batch) -> torch.Tensor:
        """Cross-entropy summed over the target tokens: batches of different lengths then average per token."""
        with self.router.activate(self.plan):
            logits = self.backbone.model(**batch.inputs, decoder_input_ids=batch.decoder_input_ids).logits
        return F.cross_entropy(
            logits.flatten(0, 1).float(), batch.labels.flatten(), ignore_index=IGNORE, reduction="sum"
        )

    def generate(self, inputs: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy decoding with the arguments `Engine.generate` uses, so the server reproduces these outputs."""
        tok = self.backbone.tokenizer
        with torch.no_grad(), self.router.activate(self.plan):
            out = self.backbone.model.generate(
                **self.encode(inputs),
                max_new_tokens=max_new_tokens,
                min_new_tokens=0,
                num_beams=1,
                num_return_sequences=1,
                do_sample=False,
            )
        return tok.batch_decode(out, skip_special_tokens=True, clean_up_tokenization_spaces=False)  # as TextCodec


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    predictions: list[str]


def evaluate(session: Session, examples: Sequence[Example], batch_size: int, max_new_tokens: int) -> Evaluation:
    """Mean token loss and exact-match accuracy of greedy outputs: the loss moves before the accuracy does."""
    total, tokens, predictions = 0.0, 0, []
    for chunk in chunks(examples, batch_size):
        batch = session.batch(chunk)
        with torch.no_grad():
            total += session.token_losses(batch).item()
        tokens += int((batch.labels != IGNORE).sum())
        predictions += session.generate([e.input for e in chunk], max_new_tokens)
    hits = sum(p == e.target for p, e in zip(predictions, examples, strict=True))
    return Evaluation(total / tokens, hits / len(examples), predictions)
