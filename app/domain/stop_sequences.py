"""Stop sequences (OpenAI's `stop`): end the reply where one appears, and never show any part of it."""

from __future__ import annotations

from collections.abc import Sequence

from app.domain.reasoning import partial_suffix_length


class StopSequences:
    """Feed content deltas in order; get back the text that is safe to show, and whether a stop was hit.

    Text that might be the start of a stop sequence is held back until the next delta settles it.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._pending = ""
        self.hit = False

    def feed(self, text: str) -> str:
        if self.hit:
            return ""
        self._pending += text
        cut = min((i for i in (self._pending.find(stop) for stop in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            shown, self._pending = self._pending[:cut], ""
            return shown
        held = max((partial_suffix_length(self._pending, stop) for stop in self._stops), default=0)
        shown, self._pending = self._pending[: len(self._pending) - held], self._pending[len(self._pending) - held :]
        return shown

    def flush(self) -> str:
        """The held-back rest at the end of the reply (it turned out not to be a stop sequence)."""
        rest, self._pending = ("" if self.hit else self._pending), ""
        return rest
