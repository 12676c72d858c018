"""Text ↔ token ids with the server's limits: the side of a request that never touches the model.

The API process tokenizes inputs and decodes outputs with this (the engine process never sees text), and
the in-process `Service` does the same, so both answer alike.
"""

from __future__ import annotations

from collections.abc import Sequence

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from .errors import InvalidRequest
from .messages import TokenIds, TokenLogprob

# An input longer than max_input_tokens × this many characters cannot fit (no T5 or ByT5 token is longer),
# so it is refused before the tokenizer spends time on it.
MAX_CHARS_PER_TOKEN = 32


class TextCodec:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_input_tokens: int) -> None:
        self.tokenizer, self.max_input_tokens = tokenizer, max_input_tokens
        self._special = set(tokenizer.all_special_ids)
        self._texts: dict[int, str] = {}  # token_text's answers (a vocabulary's worth at most)

    @classmethod
    def load(cls, source: str, local_only: bool, max_input_tokens: int) -> TextCodec:
        """The backbone's tokenizer alone (hub id or directory), as `load_backbone` loads it."""
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        tokenizer.padding_side = "right"
        return cls(tokenizer, max_input_tokens)

    def tokenize(self, texts: Sequence[str], what: str = "input") -> list[list[int]]:
        """Token ids of `texts` (EOS included); raises InvalidRequest naming a text over the limit.

        Nothing is truncated silently: a truncated target would be scored as another string. A text too long
        to fit even at `MAX_CHARS_PER_TOKEN` characters a token is refused before the tokenizer sees it.
        """
        chars = self.max_input_tokens * MAX_CHARS_PER_TOKEN
        for i, text in enumerate(texts):
            if len(text) > chars:
                raise InvalidRequest(
                    f"{what} {i} has {len(text)} characters, more than {self.max_input_tokens} tokens can hold"
                )
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise InvalidRequest(f"{what} {i} is not valid Unicode text ({e.reason})") from None
        ids = self.tokenizer(list(texts))["input_ids"]
        for i, row in enumerate(ids):
            if len(row) > self.max_input_tokens:
                raise InvalidRequest(f"{what} {i} has {len(row)} tokens; the limit is {self.max_input_tokens}")
        return ids

    def checked_ids(self, rows: Sequence[object], what: str = "input") -> list[list[int]]:
        """Inputs given as token ids, used as sent (no EOS added): each a non-empty list of ids the tokenizer knows,
        within the length limit; InvalidRequest names the first that is not."""
        vocab = len(self.tokenizer)
        out = []
        for i, row in enumerate(rows):
            if not isinstance(row, list) or not row or not all(type(t) is int for t in row):
                raise InvalidRequest(f"{what} {i} must be text or a non-empty list of token ids, not both mixed")
            if len(row) > self.max_input_tokens:
                raise InvalidRequest(f"{what} {i} has {len(row)} tokens; the limit is {self.max_input_tokens}")
            if bad := [t for t in row if not 0 <= t < vocab]:
                raise InvalidRequest(f"{what} {i} has token id {bad[0]}, outside this tokenizer's 0..{vocab - 1}")
            out.append(list(row))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        """The text the tokens spell. Never `clean_up_tokenization_spaces` (a checkpoint saved by transformers 4 often
        sets it): it rewrites text already decoded (" !" becomes "!" once the "!" arrives), so a stream's deltas
        could not add up to the answer; as vLLM, the text is exactly its tokens'."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def token_text(self, token: int) -> str:
        """One token as logprobs show it: its text alone, or its name if special (EOS is `</s>`, not ""). A byte
        token of a multi-byte character (ByT5) is U+FFFD alone: only its neighbours make it a character."""
        text = self._texts.get(token)
        if text is None:
            special = token in self._special
            text = self.tokenizer.convert_ids_to_tokens(token) if special else self.decode([token])
            self._texts[token] = text
        return text

    def logprobs(self, ids: Sequence[int], logprobs: Sequence[TokenIds]) -> list[TokenLogprob]:
        """The engine's log-probabilities of `ids` with every token as text."""
        text = self.token_text
        return [
            TokenLogprob(text(t), lp, [(text(a), v) for a, v in top], t in self._special)
            for t, (lp, top) in zip(ids, logprobs, strict=True)
        ]
