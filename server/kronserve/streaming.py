"""Text out of tokens as they come: deltas for a stream, stop strings, and the final texts they add up to.

Decoding the whole sequence each time (not token by token) keeps multi-byte characters and SentencePiece's
spaces right; text that may still change is held back: a trailing U+FFFD (an incomplete UTF-8 character,
e.g. ByT5 mid-character) and, when stop strings are set, the last characters that could begin one. The
deltas of an input always add up to its final text.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from .messages import Generation

REPLACEMENT = "\ufffd"


class StreamText:
    def __init__(self, decode: Callable[[list[int]], str], inputs: int, stop: Sequence[str] = ()) -> None:
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._ids: list[list[int]] = [[] for _ in range(inputs)]
        self._sent = [""] * inputs
        self._cut: list[str | None] = [None] * inputs

    def add(self, index: int, token: int) -> tuple[str, bool]:
        """(text to send now, whether a stop string just ended this input)."""
        if self._cut[index] is not None:
            return "", False
        self._ids[index].append(token)
        text = self.decode(self._ids[index])
        at = self._stop_at(text)
        if at is not None:
            self._cut[index] = text[:at]
            return self._send(index, text[:at]), True
        safe = text.rstrip(REPLACEMENT)
        return self._send(index, safe[: max(len(self._sent[index]), len(safe) - self._hold)]), False

    def finish(self, index: int, answer: Generation) -> tuple[str, Generation]:
        """(the rest of the text to send, the final answer): cut at a stop string, which makes it "stop"."""
        cut = self._cut[index]
        if cut is None:
            at = self._stop_at(answer.text)
            cut = answer.text if at is None else answer.text[:at]
        reason = "stop" if cut != answer.text else answer.finish_reason
        return self._send(index, cut), dataclasses.replace(answer, text=cut, finish_reason=reason)

    def _stop_at(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def _send(self, index: int, upto: str) -> str:
        sent = self._sent[index]
        if len(upto) <= len(sent) or not upto.startswith(sent):
            return ""
        self._sent[index] = upto
        return upto[len(sent) :]
