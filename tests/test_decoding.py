"""Token choice: ids past the tokenizer are never produced (greedy, sampling, beams, HF generate), on a
backbone whose logits are wider than its tokenizer, as real t5-small's (32,128 vs 32,100) and the offline
demo backbone's (32,128 vs ByT5's 384) are."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import ByT5Tokenizer, T5Config, T5ForConditionalGeneration

from kronserve.backbone import load_backbone
from kronserve.decoding import BeamSequence, Sequence, Vocabulary, greedy_tokens
from kronserve.engine import Engine
from kronserve.messages import GenerationParams

from .conftest import held_slots, make_adapter

VOCAB = Vocabulary(size=5, eos=1, start=0)


def test_masked_ids_are_never_chosen_even_when_they_win() -> None:
    logits = torch.tensor([[0.0, 0.1, 0.2, 0.3, 0.4, 9.0, 8.0], [0.0, 0.5, 0.2, 0.3, 0.1, 0.0, 7.0]])
    seqs = [Sequence(GenerationParams(), VOCAB, torch.device("cpu")) for _ in range(2)]
    assert greedy_tokens(logits.clone(), seqs) == [4, 1]
    sampler = Sequence(GenerationParams(temperature=5.0, seed=1), VOCAB, torch.device("cpu"))
    assert all(sampler.choose(logits[:1].clone()).tokens[0] < 5 for _ in range(50))


def test_min_new_tokens_holds_eos_back() -> None:
    seq = Sequence(GenerationParams(max_new_tokens=3, min_new_tokens=2), VOCAB, torch.device("cpu"))
    eos_wins = torch.tensor([[0.0, 5.0, 1.0, 0.0, 0.0]])
    assert [seq.choose(eos_wins.clone()).tokens[0] for _ in range(3)] == [2, 2, 1]
    assert seq.done and seq.output() == [2, 2, 1]


def test_top_k_1_is_greedy_and_a_seed_repeats_its_draws() -> None:
    logits = torch.randn(1, 5, generator=torch.Generator().manual_seed(3))
    top1 = Sequence(GenerationParams(temperature=1.0, top_k=1, seed=5), VOCAB, torch.device("cpu"))
    assert top1.choose(logits.clone()).tokens[0] == int(logits.argmax())
    draws = [
        [Sequence(GenerationParams(temperature=2.0, seed=9, max_new_tokens=20), VOCAB, torch.device("cpu"))]
        for _ in range(2)
    ]
    for (seq,) in draws:
        for _ in range(20):
            seq.choose(logits.clone())
    assert draws[0][0].output() == draws[1][0].output()


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny T5 with 1,024 logits and ByT5's 384-id tokenizer."""
    out = tmp_path_factory.mktemp("wide")
    config = T5Config(
        d_model=64,
        d_ff=128,
        d_kv=16,
        num_heads=4,
        num_layers=2,
        num_decoder_layers=2,
        vocab_size=1024,
        feed_forward_proj="relu",
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config)
    with torch.no_grad():
        model.lm_head.weight[384:] *= 50  # the ids past the tokenizer win unless masked
    model.save_pretrained(out)
    ByT5Tokenizer().save_pretrained(out)
    return out


@pytest.mark.parametrize("method", ["houlsby", "pfeiffer", "lora"])
def test_wide_logits_never_produce_an_undecodable_id(wide_dir: Path, method: str) -> None:
    bb = load_backbone(str(wide_dir), device="cpu")
    engine = Engine(bb)
    engine.load(make_adapter(bb, "t", method, seed=0, std=0.3))
    assert engine.vocab.size == 384
    for n in (1, 2, 4):
        out = engine.generate(["t", None], ["ab", "some longer input"], max_new_tokens=n, num_beams=2)
        assert all(i < 384 for row in out.token_ids for i in row)
    (slot,) = held_slots(engine, ["t"])
    pre = engine.prefill(engine.tokenize(["ab"]), [slot], [2])
    beam = BeamSequence(GenerationParams(max_new_tokens=3, num_beams=2), engine.vocab)
    beam.choose(pre.logits.clone())
    greedy = Sequence(GenerationParams(), engine.vocab, torch.device("cpu"))
    assert greedy.choose(pre.logits[:1].clone()).tokens[0] < 384
    assert int(pre.logits[0].argmax()) >= 384  # without the mask an undecodable id would have come out
