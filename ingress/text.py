"""Generated token ids -> text deltas, with stop strings: what the client sees is text, the router makes ids.

`TextStream` decodes incrementally (two offsets into the token list, as vLLM's detokenizer does): each new
token's text is `decode(window + token)` minus `decode(window)`, so SentencePiece's leading-space handling is
the same on both sides and the cost per token does not grow with the length of the output. A few prompt
tokens start the window, so the first generated word keeps its leading space ("The answer is" + " 42").

Text that could still become invalid is held back:
- a decode that ends in U+FFFD (a multi-byte character split across byte-fallback tokens) waits for the
  next token;
- a tail of the text that is the start of a stop string waits until it is either the whole stop string
  (then the text is cut before it and the request ends with finish_reason "stop") or no longer a prefix.
"""

from __future__ import annotations

CONTEXT_TOKENS = 4  # prompt tokens that start the decode window (enough for SentencePiece's spacing)
REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer, prompt: list[int], stop: list[str] = ()):
        self.tokenizer = tokenizer
        context = list(prompt[-CONTEXT_TOKENS:])
        self._tokens = context
        self._prefix_offset = 0
        self._read_offset = len(context)
        self._prefix_text = tokenizer.decode(context) if context else ""
        self.stop = [s for s in stop if s]
        self.text = ""  # all text decoded so far (cut at a stop string once one is seen)
        self.emitted = 0  # characters of self.text handed out
        self.stopped = False  # a stop string was found; no more text

    def add(self, token: int) -> str:
        """Take one generated token; return the text that can be sent now (possibly empty)."""
        if self.stopped:
            return ""
        self._tokens.append(int(token))
        full = self.tokenizer.decode(self._tokens[self._prefix_offset:])
        if full.endswith(REPLACEMENT):  # a character split over tokens: wait for the rest of it
            return ""
        new = full[len(self._prefix_text):] if full.startswith(self._prefix_text) else full
        self._prefix_offset, self._read_offset = self._read_offset, len(self._tokens)
        self._prefix_text = self.tokenizer.decode(self._tokens[self._prefix_offset:self._read_offset])
        self.text += new
        return self._release()

    def finish(self) -> str:
        """The request ended: whatever is still held back (a partial character decodes as U+FFFD)."""
        released = ""
        if not self.stopped and self._read_offset < len(self._tokens):
            full = self.tokenizer.decode(self._tokens[self._prefix_offset:])
            self.text += full[len(self._prefix_text):] if full.startswith(self._prefix_text) else full
            self._read_offset = len(self._tokens)
            released = self._release()
        if self.stopped:
            return released
        rest = self.text[self.emitted:]  # a tail that was only the start of a stop string
        self.emitted = len(self.text)
        return released + rest

    def _release(self) -> str:
        cut = find_stop(self.text, self.stop, max(0, self.emitted - max((len(s) for s in self.stop), default=0)))
        if cut is not None:
            self.text = self.text[:cut]
            self.stopped = True
            end = cut
        else:
            end = len(self.text) - held_back(self.text, self.stop)
        end = max(end, self.emitted)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out


def find_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Index where the earliest stop string begins in text[start:], or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def completion_text(tokenizer, prompt: list[int], tokens: list[int], stop: list[str] = ()) -> str:
    """The text a client receives for `tokens` generated after `prompt` (for tests and offline use)."""
    stream = TextStream(tokenizer, prompt, stop)
    parts = [stream.add(t) for t in tokens]
    return "".join(parts) + stream.finish()
