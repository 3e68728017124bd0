"""Which slots decode under a grammar, and the token masks each step needs (host side, no JAX).

A slot's mask for its next token depends on the token it just generated. The driver may start step k+1
before it reads step k's tokens (pipelining); a grammar slot whose last token is still in flight then sits
that step out (`skip`) rather than decoding under a stale mask, while every other slot decodes as usual. So
a constrained request runs at every step without pipelining and every other step with it; nobody waits for
it. Masks are the per-slot bitmasks of grok1/grammar.py; computing one is a few microseconds.
"""

from __future__ import annotations

import numpy as np


class GrammarSlots:
    def __init__(self):
        self._matchers: dict = {}  # slot -> grok1.grammar.Matcher
        self._in_flight: set[int] = set()  # slots whose last decoded token has not been handed out yet

    def __bool__(self) -> bool:
        return bool(self._matchers)

    def admit(self, slot: int, request) -> np.ndarray | None:
        """The mask of a request's first token (None: no grammar)."""
        if getattr(request, "grammar", None) is None:
            return None
        matcher = request.grammar.matcher()
        self._matchers[slot] = matcher
        self._in_flight.discard(slot)
        return matcher.mask()

    def for_step(self, running: list[int]) -> tuple[dict[int, np.ndarray], list[int]]:
        """(masks of the grammar slots that decode in this step, grammar slots that sit it out)."""
        masks, skip = {}, []
        for slot in running:
            matcher = self._matchers.get(slot)
            if matcher is None:
                continue
            if slot in self._in_flight:
                skip.append(slot)
            else:
                masks[slot] = matcher.mask()
                self._in_flight.add(slot)
        return masks, skip

    def delivered(self, slot: int, token: int) -> None:
        matcher = self._matchers.get(slot)
        if matcher is None:
            return
        self._in_flight.discard(slot)
        try:
            matcher.advance(token)
        except ValueError:  # a token its mask forbade: a bug, never a reason to fail the loop; unconstrain it
            self._matchers.pop(slot)

    def free(self, slot: int) -> None:
        self._matchers.pop(slot, None)
        self._in_flight.discard(slot)
