"""Stop strings over text that arrives in pieces: a piece is held back while it could still
be the start of a stop string, so a client never sees text that a stop then takes back."""

from __future__ import annotations


class StopFilter:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything pushed so far
        self.sent = 0  # how much of `text` has been let through
        self.stopped = False

    def push(self, piece: str) -> str:
        """Add `piece`; return the text that is safe to send now. After a stop string
        matched, `stopped` is True and the text up to (not including) it has been sent."""
        if self.stopped:
            return ""
        self.text += piece
        if not self.stops:
            return self._release(len(self.text))
        # a match may begin in text already held back, never in text already sent
        start = max(0, self.sent - max(len(s) for s in self.stops) + 1)
        hits = [i for i in (self.text.find(s, start) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            self.text = self.text[: min(hits)]
            return self._release(len(self.text))
        return self._release(len(self.text) - self._held())

    def flush(self) -> str:
        """The held-back tail, once no more text will come (no stop string matched)."""
        return "" if self.stopped else self._release(len(self.text))

    def _held(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:n]):
                    longest = n
                    break
        return longest

    def _release(self, end: int) -> str:
        end = max(end, self.sent)
        out = self.text[self.sent : end]
        self.sent = end
        return out
