"""Structured output on the host: a regular grammar over the SentencePiece vocabulary, as per-step token masks.

No JAX (the router and the ingress import it). The grammar library is outlines-core (Rust, no Python
dependencies; xgrammar needs torch, transformers and triton): it compiles a regex into an index of which
tokens each automaton state allows, over the vocabulary given as each token's bytes.

1. `token_bytes(sp)` maps every token id to the bytes it adds to the text (`▁` is a space, `<0xNN>` is the
   byte NN, control tokens and [UNK] add nothing and are never allowed; EOS ends the grammar).
2. `GrammarCompiler.compile(regex)` builds the index once per regex (LRU-cached, thread-safe: the callers
   compile off their event loop, since a JSON schema over 131,072 tokens takes about a second).
3. A `Matcher` per request walks the index: `mask()` is the bitmask of allowed tokens for the next step
   (uint32 [V / 32], bit t % 32 of word t // 32: the layout the sampler unpacks), `advance(token)` moves on.

The text a grammar sees is the generated text as the client receives it: the tokens' bytes concatenated
(the first generated token keeps its leading space; ingress/text.py decodes the same way).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

MASK_WORD_BITS = 32
CACHE_SIZE = 64  # compiled grammars kept (an index is a few MiB at most for the schemas we accept)


class GrammarError(ValueError):
    """The grammar cannot be compiled, or no text at all satisfies it."""


def mask_words(vocab_size: int) -> int:
    return -(-vocab_size // MASK_WORD_BITS)


def token_bytes(sp) -> list[bytes | None]:
    """Each token id's bytes in the generated text (None: never generated as text: control tokens, [UNK])."""
    out: list[bytes | None] = []
    for token in range(sp.vocab_size()):
        piece = sp.id_to_piece(token)
        if sp.is_control(token) or sp.is_unknown(token):
            out.append(None)
        elif sp.is_byte(token):  # "<0x0A>"
            out.append(bytes([int(piece[3:5], 16)]))
        else:
            out.append(piece.replace("\u2581", " ").encode("utf-8"))
    return out


def vocabulary_map(pieces: list[bytes | None]) -> dict[bytes, list[int]]:
    by_bytes: dict[bytes, list[int]] = {}
    for token, raw in enumerate(pieces):
        if raw:  # empty or None: adds nothing to the text, never allowed under a grammar
            by_bytes.setdefault(raw, []).append(token)
    return by_bytes


@dataclass(frozen=True)
class CompiledGrammar:
    """A regex compiled over one vocabulary: what a request carries to the router (it pickles)."""

    regex: str
    index: object  # outlines_core.Index
    vocab_size: int
    eos_token: int

    def matcher(self) -> "Matcher":
        return Matcher(self.index, self.vocab_size, self.eos_token)


class GrammarCompiler:
    """Regex -> compiled index over one vocabulary, cached by regex."""

    def __init__(self, pieces: list[bytes | None], eos_token: int):
        from outlines_core import Vocabulary  # imported here: only processes that compile grammars need it

        self.vocab_size = len(pieces)
        self.eos_token = eos_token
        self._vocabulary = Vocabulary(eos_token, vocabulary_map(pieces))
        self._cache: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_tokenizer(cls, tokenizer) -> "GrammarCompiler":
        """One compiler (and cache) per tokenizer file in this process."""
        key = (str(tokenizer.path), tokenizer.eos_id)
        with _COMPILERS_LOCK:
            if key not in _COMPILERS:
                _COMPILERS[key] = cls(token_bytes(tokenizer.sentencepiece), tokenizer.eos_id)
            return _COMPILERS[key]

    def compile(self, regex: str) -> CompiledGrammar:
        with self._lock:
            if regex in self._cache:
                self._cache.move_to_end(regex)
                return self._cache[regex]
        from outlines_core import Guide, Index

        try:
            index = Index(regex, self._vocabulary)
        except (ValueError, RuntimeError) as err:
            raise GrammarError(f"the grammar cannot be compiled: {str(err)[:200]}") from None
        if set(Guide(index).get_tokens()) <= {self.eos_token}:
            raise GrammarError("no text satisfies the grammar (only the empty text does)")
        compiled = CompiledGrammar(regex, index, self.vocab_size, self.eos_token)
        with self._lock:
            self._cache[regex] = compiled
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, regex: str) -> "Matcher":
        return self.compile(regex).matcher()


_COMPILERS: dict[tuple[str, int], GrammarCompiler] = {}
_COMPILERS_LOCK = threading.Lock()


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, index, vocab_size: int, eos_token: int):
        from outlines_core import Guide

        self._guide = Guide(index)
        self.vocab_size = vocab_size
        self.eos_token = eos_token

    def mask(self) -> np.ndarray:
        """uint32 [ceil(V / 32)]: bit t % 32 of word t // 32 is set when token t is allowed next."""
        words = np.zeros(mask_words(self.vocab_size), np.int32)
        self._guide.write_mask_into(words.ctypes.data, words.size, words.itemsize)
        return words.view(np.uint32)

    def allowed(self) -> list[int]:
        return list(self._guide.get_tokens())

    def advance(self, token: int) -> None:
        """Take the token generated (EOS once finished is a no-op; a token the mask did not allow raises)."""
        if token == self.eos_token and self.finished:
            return
        try:
            self._guide.advance(int(token), return_tokens=False)
        except (ValueError, RuntimeError) as err:
            raise GrammarError(f"token {token} is not allowed by the grammar here") from err

    @property
    def finished(self) -> bool:
        """The text so far is a whole match (EOS is allowed next)."""
        return self._guide.is_finished()


def unpack_mask(words: np.ndarray, vocab_size: int) -> np.ndarray:
    """bool [V] from a bitmask (the reference the sampler's unpacking is tested against)."""
    bits = np.unpackbits(np.ascontiguousarray(words, np.uint32).view(np.uint8), bitorder="little")
    return bits[:vocab_size].astype(bool)
