"""The text of a span as its tokens arrive: stop strings, and deltas that never take text back."""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Decoding a partial multi-byte character gives U+FFFD; text ending in it may still change.
REPLACEMENT = "\ufffd"


class SpanText:
    """Decoded text of a growing list of tokens, cut at the first stop string.

    `add(token)` reports whether a stop string appeared (decoding again only when there are stop
    strings: without them the text is decoded when asked for); `delta()` returns the text not
    shown yet, holding back what may still change (an incomplete character, or a tail that could
    begin a stop string). After `finish()`, `delta()` returns the rest. The shown
    deltas joined always equal `text` once finished, so streamed and whole answers agree.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self._text = ""
        self._decoded = 0  # how many of the tokens _text was decoded from
        self.shown = 0
        self.stopped = False
        self.finished = False

    def add(self, token: int) -> bool:
        """Append a token; True when the text now holds a stop string (the text is cut before it)."""
        self.tokens.append(token)
        if not self.stop:
            return False
        before = len(self._text)  # decoded up to the previous token (there are stop strings)
        self._text, self._decoded = self.decode(self.tokens), len(self.tokens)
        longest = max((len(s) for s in self.stop), default=0)
        start = max(0, before - longest)  # a stop string may straddle the old end
        hits = [i for i in (self._text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self._text = self._text[: min(hits)]
            self.stopped = True
            self.finish()
        return self.stopped

    @property
    def text(self) -> str:
        if self._decoded < len(self.tokens):
            self._text, self._decoded = self.decode(self.tokens), len(self.tokens)
        return self._text

    def finish(self) -> None:
        self.finished = True

    def _safe_end(self) -> int:
        end = len(self.text)
        if self.finished:
            return end
        while end > 0 and self.text[end - 1] == REPLACEMENT:
            end -= 1
        hold = 0  # the longest tail that is a proper prefix of a stop string
        for s in self.stop:
            hold = max([hold] + [n for n in range(1, min(len(s) - 1, end) + 1) if self.text.endswith(s[:n], 0, end)])
        return end - hold

    def delta(self) -> str:
        end = self._safe_end()
        if end <= self.shown:
            return ""
        out = self.text[self.shown : end]
        self.shown = end
        return out
