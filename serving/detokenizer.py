"""Incremental detokenization of one sequence: the text of its tokens, handed out piece by piece.

Decoding the whole sequence again for every new token costs O(length) per token. `TextStream` decodes
only a window of recent tokens, as vLLM's detokenizer and HF's TextStreamer do: `prefix_offset` ..
`read_offset` are the tokens whose text was last resolved, and a new token's text is the decode of the
window from `prefix_offset` minus the decode of the window's resolved part. The window starts at a
character boundary, so decoding it gives the same characters as decoding the whole sequence. A window
whose text ends in U+FFFD is an incomplete UTF-8 character (a multi-byte character split over tokens):
it stays pending, and the window grows until the character completes.

What may be handed out follows the rules `Engine` applied to the full text before: a trailing U+FFFD is
held back, so is any tail that could be the start of a stop string, and a stop string is searched for in
the text not handed out yet plus the few characters before it (a stop string may span several tokens).
Only that short unsent tail is kept, so the per-token cost does not grow with the output.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class TextStream:
    """The text of one sequence's generated tokens; `add` after each token, then `stop_at`/`take`."""

    def __init__(self, decode: Callable[[list[int]], str], stops: tuple[str, ...] = ()):
        self.decode, self.stops = decode, stops
        self.prefix_offset = self.read_offset = 0
        self.prefix_text = ""  # decode(ids[prefix_offset:read_offset])
        self.resolved = ""  # complete text from an origin at or before the first character not sent
        self.pending = ""  # decoded after `resolved`, ends in an incomplete character
        self.sent = 0  # characters of resolved + pending already handed out
        self.lookback = max((len(s) for s in stops), default=0)

    def add(self, ids: list[int]) -> None:
        """Take in the sequence's tokens so far (the last one is new)."""
        text = self.decode(ids[self.prefix_offset :])
        if len(text) > len(self.prefix_text) and not text.endswith(REPLACEMENT):
            self.resolved += text[len(self.prefix_text) :]
            self.pending = ""
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            self.prefix_text = self.decode(ids[self.prefix_offset : self.read_offset])
        else:
            self.pending = text[len(self.prefix_text) :]

    @property
    def text(self) -> str:
        """The text from the origin: what is not handed out yet and at least `lookback` characters before."""
        return self.resolved + self.pending

    def stop_at(self) -> int | None:
        """Where in `text` the first stop string (in the order given) begins, if one is there now."""
        text = self.text
        for stop in self.stops:
            at = text.find(stop, max(0, self.sent - len(stop)))
            if at != -1:
                return at
        return None

    def safe(self) -> int:
        """How far `text` may be handed out: not a trailing incomplete character, nor a tail that could be
        the beginning of a stop string."""
        text = self.text
        safe = len(text.rstrip(REPLACEMENT))
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(text)), 0, -1):
                if text.endswith(stop[:k]):
                    safe = min(safe, len(text) - k)
                    break
        return max(safe, self.sent)

    def take(self, upto: int | None = None) -> str:
        """Hand out `text` up to `upto` (everything by default); returns the new part."""
        text = self.text
        upto = len(text) if upto is None else upto
        piece = text[self.sent : upto] if upto > self.sent else ""
        self.sent = max(self.sent, upto)
        cut = max(0, min(self.sent - self.lookback, len(self.resolved)))  # keep `lookback` chars before
        if cut:
            self.resolved = self.resolved[cut:]
            self.sent -= cut
        return piece
