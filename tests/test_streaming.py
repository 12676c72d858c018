"""Incremental detokenization: the deltas of a stream add up to the text of the whole sequence, token by token, with
multi-byte characters split across tokens (ByT5) and stop strings spanning deltas, while each token decodes only a
few tokens (never the whole sequence again)."""

from __future__ import annotations

import random

import pytest

from kronserve.messages import Generation
from kronserve.streaming import CONTEXT_TOKENS, StreamText
from kronserve.text import TextCodec

TEXTS = ["plain ascii text", "naïve café — ünïcödé", "emoji 🙂🚀 and CJK 漢字かな", "a\nnew line\tand tabs"]


@pytest.fixture(params=["byt5", "sentencepiece"])
def tokenizer(request, backbone):
    """ByT5's bytes (characters split across tokens) and a SentencePiece T5 tokenizer (words and spaces merged,
    `clean_up_tokenization_spaces`), each as the server loads it."""
    if request.param == "byt5":
        return backbone.tokenizer
    from kronserve.backbone import load_backbone

    return load_backbone(str(request.getfixturevalue("sentencepiece_dir")), device="cpu").tokenizer


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = ()) -> tuple[list[str], str, Generation, list[int]]:
    """(deltas, the rest sent at the end, the final answer, lengths of the windows decoded per token)."""
    windows: list[int] = []

    codec = TextCodec(tokenizer, 512)

    def decode(part: list[int]) -> str:
        windows.append(len(part))
        return codec.decode(part)

    text = StreamText(decode, 1, stop)
    deltas = []
    for token in ids:
        delta, stopped = text.add(0, token)
        deltas.append(delta)
        if stopped:
            break
    whole = codec.decode(ids)
    rest, final = text.finish(0, Generation(whole, len(ids), 1, "length"))
    return deltas, rest, final, windows


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_whole_decode_and_each_token_decodes_a_short_window(tokenizer, text: str) -> None:
    ids = tokenizer(text)["input_ids"][:-1]  # the generated tokens: no EOS here
    deltas, rest, final, windows = stream(tokenizer, ids)
    assert "".join(deltas) + rest == final.text == TextCodec(tokenizer, 512).decode(ids)
    assert all("\ufffd" not in d for d in deltas)  # half a character is never sent
    assert max(windows) <= CONTEXT_TOKENS + 4  # a window, never the whole sequence (ByT5: a character is ≤ 4 ids)


@pytest.mark.parametrize("seed", range(5))
def test_a_stop_string_spanning_deltas_cuts_the_text_and_nothing_past_it_is_sent(tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "délta", "stop", "omega", "🙂", ",", "!"]
    text = " ".join(rng.choice(words) for _ in range(12)) + " stop tail"
    ids = tokenizer(text)["input_ids"][:-1]
    whole = TextCodec(tokenizer, 512).decode(ids)  # SentencePiece: 🙂 is <unk>
    deltas, rest, final, _ = stream(tokenizer, ids, stop=("stop",))
    assert "".join(deltas) + rest == final.text == whole[: whole.index("stop")]
    assert final.finish_reason == "stop"
