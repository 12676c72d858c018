"""Text out of tokens as they come: deltas for a stream, stop strings, and the final texts they add up to.

Decoding is incremental (TGI's `decode_token`): each new token decodes a short window from `prefix` (a few
tokens before the unread ones, so SentencePiece's leading spaces and multi-token characters come out as
they would in the whole text) to the end, and only the text past the window's already-read part is new.
The cost per token is a handful of tokens, not the whole sequence. Text that may still change is held
back: a window ending in U+FFFD (an incomplete UTF-8 character, e.g. ByT5 mid-character) waits for its
next token, and, when stop strings are set, the last characters that could begin one. The deltas of an
input add up to its final text whenever that text extends what was sent (the final decode of the whole
sequence is the answer's text; the rest of it goes out with the last event).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from .messages import Generation

REPLACEMENT = "\ufffd"
# Tokens decoded before the unread ones, so a token's text is read in context (TGI uses 5 likewise).
CONTEXT_TOKENS = 5


class _Input:
    """One input's incremental state: ids, the decode window's offsets, the text decoded and sent."""

    __slots__ = ("cut", "ids", "prefix", "read", "sent", "text")

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] were decoded already (context); ids[read:] not yet
        self.text = ""  # everything decoded so far
        self.sent = 0  # characters of `text` sent as deltas
        self.cut: str | None = None  # the text up to a stop string, once one appeared


class StreamText:
    def __init__(
        self, decode: Callable[[list[int]], str], inputs: int, stop: Sequence[str] = (), include_stop: bool = False
    ) -> None:
        """`include_stop`: an input's text ends with the stop string it met, not before it."""
        self.decode, self.stop, self.include_stop = decode, tuple(s for s in stop if s), include_stop
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._inputs = [_Input() for _ in range(inputs)]

    def add(self, index: int, token: int) -> tuple[str, bool]:
        """(text to send now, whether a stop string just ended this input)."""
        state = self._inputs[index]
        if state.cut is not None:
            return "", False
        state.ids.append(token)
        new = self._new_text(state)
        if not new:
            return "", False
        before = len(state.text)
        state.text += new
        at = self._stop_at(state.text, max(0, before - self._hold))
        if at is not None:
            state.cut = state.text[:at]
            return self._send(state, at), True
        return self._send(state, max(state.sent, len(state.text) - self._hold)), False

    def finish(self, index: int, answer: Generation) -> tuple[str, Generation]:
        """(the rest of the text to send, the final answer): cut at a stop string, which makes it "stop"."""
        state = self._inputs[index]
        cut = state.cut
        if cut is None and (at := self._stop_at(answer.text, 0)) is not None:
            cut = answer.text[:at]
        reason = answer.finish_reason if cut is None else "stop"
        cut = answer.text if cut is None else cut
        sent = state.text[: state.sent]
        rest = cut[len(sent) :] if len(cut) > len(sent) and cut.startswith(sent) else ""
        state.sent = len(cut)
        return rest, dataclasses.replace(answer, text=cut, finish_reason=reason)

    def _new_text(self, state: _Input) -> str:
        """The text the unread tokens add, or "" while the window ends mid-character."""
        window = state.ids[state.prefix :]
        context = self.decode(state.ids[state.prefix : state.read]) if state.read > state.prefix else ""
        text = self.decode(window)
        if len(text) <= len(context) or text.endswith(REPLACEMENT):
            return ""
        state.prefix, state.read = max(state.prefix, len(state.ids) - CONTEXT_TOKENS), len(state.ids)
        return text[len(context) :]

    def _stop_at(self, text: str, start: int) -> int | None:
        """Where the text ends because of the first stop string found from `start` (before it, or after it)."""
        hits = [(i, len(s)) for s in self.stop if (i := text.find(s, start)) >= 0]
        if not hits:
            return None
        at, length = min(hits)
        return at + length if self.include_stop else at

    @staticmethod
    def _send(state: _Input, upto: int) -> str:
        if upto <= state.sent:
            return ""
        delta, state.sent = state.text[state.sent : upto], upto
        return delta
