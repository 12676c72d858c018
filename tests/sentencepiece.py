"""A SentencePiece T5 backbone built on the spot: a Unigram tokenizer trained (the `tokenizers` library) on a small
generated corpus, wrapped as `T5TokenizerFast` with T5's special tokens (pad 0, EOS 1, unk 2), 100 sentinels and
`clean_up_tokenization_spaces` (as a real t5-small's tokenizer behaves), beside a tiny random T5 whose vocabulary
has a few ids more than the tokenizer (as t5-small's 32,128 against 32,100). The ByT5 byte tokenizer every other
test uses never merges characters or spaces; this one does, so streaming, stop strings, usage counts and logprobs
are tested on the kind of tokenizer users' checkpoints have."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import T5ForConditionalGeneration, T5TokenizerFast

from kronserve.backbone import t5_config

WORDS = (
    "the",
    "a",
    "film",
    "movie",
    "great",
    "terrible",
    "plot",
    "actor",
    "scene",
    "story",
    "music",
    "we",
    "they",
    "love",
    "hate",
    "really",
    "not",
    "very",
    "good",
    "bad",
    "café",
    "naïve",
    "résumé",
    "über",
    "straße",
    "東京",
    "ramen",
    "pizza",
    "golf",
    "news",
    "world",
    "hello",
    "input",
    "another",
    "number",
    "sports",
    "alpha",
    "beta",
    "gamma",
    "délta",
    "omega",
    "stop",
)
EXTRA_IDS = 100
SPARE_IDS = 4  # model ids past the tokenizer's, masked when decoding (real t5-small has 28)


def sentencepiece_tokenizer(seed: int = 0) -> T5TokenizerFast:
    rng = random.Random(seed)
    corpus = [
        " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice(".!?,;:") for _ in range(3000)
    ]
    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "</s>", "<unk>"],
        unk_token="<unk>",
        initial_alphabet=list("abcdefghijklmnopqrstuvwxyz.,!?;:"),
    )
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_ids=EXTRA_IDS,
        clean_up_tokenization_spaces=True,
    )


def write_sentencepiece_backbone(out_dir: str | Path, seed: int = 0) -> Path:
    """The tiny shape with this tokenizer, saved like a user's checkpoint."""
    out = Path(out_dir)
    tokenizer = sentencepiece_tokenizer(seed)
    config = t5_config("tiny", vocab_size=len(tokenizer) + SPARE_IDS)
    torch.manual_seed(seed)
    T5ForConditionalGeneration(config).eval().save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
