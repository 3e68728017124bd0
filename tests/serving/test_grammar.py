"""Structured output on the host (grok1/grammar.py, ingress/structured.py): the SentencePiece vocabulary as
bytes, compiled grammars, per-step masks, and the request fields that ask for them. The real tokenizer is
used throughout (skipped when it is missing), as is outlines-core (skipped when it is not installed).
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from ingress import protocol, structured
from ingress.errors import ApiError
from tests.serving.fakes import CharTokenizer

pytest.importorskip("outlines_core")

from grok1.grammar import GrammarCompiler, GrammarError, mask_words, token_bytes, unpack_mask  # noqa: E402

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}},
          "required": ["name", "ok", "color"]}


@pytest.fixture(scope="module")
def tokenizer():
    from grok1.tokenizer import Tokenizer, TokenizerNotFound

    try:
        return Tokenizer.load()
    except TokenizerNotFound as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler.for_tokenizer(tokenizer)


def test_vocabulary_bytes_are_pinned(tokenizer):
    """What each token adds to the text: '▁' is a space, '<0xNN>' the byte NN, control tokens and [UNK]
    nothing. Pinned on the real vocabulary (ids from its file)."""
    pieces = token_bytes(tokenizer.sentencepiece)
    assert len(pieces) == 131072
    assert pieces[0] is None and pieces[1] is None and pieces[2] is None and pieces[3] is None  # PAD BOS EOS UNK
    assert pieces[4] == b"\n" and pieces[14] == b"0"
    assert pieces[69] == b"\x00" and pieces[69 + 0xF0] == b"\xf0"  # byte fallback <0x00> .. <0xFF>
    assert sum(1 for token in range(len(pieces)) if tokenizer.sentencepiece.is_byte(token)) == 256
    ids = tokenizer.encode('{"a": 1}\n  é😀')
    assert [tokenizer.id_to_piece(i) for i in ids] == ["▁{\"", "a", "\":", "▁", "1", "}", "\n", "▁▁", "é",
                                                       "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    # Concatenated, the bytes are the text (with the leading space SentencePiece adds to the first piece).
    assert b"".join(pieces[i] for i in ids).decode() == ' {"a": 1}\n  é😀'


def test_mask_layout_and_walk(compiler, tokenizer):
    matcher = compiler.matcher(r"(yes|no)")
    words = matcher.mask()
    assert words.dtype == np.uint32 and words.shape == (mask_words(131072),)
    allowed = unpack_mask(words, 131072)
    assert sorted(np.flatnonzero(allowed)) == sorted(matcher.allowed())
    assert tokenizer.eos_id not in matcher.allowed() and not matcher.finished
    pieces = token_bytes(tokenizer.sentencepiece)
    assert all(b"yes".startswith(pieces[t]) or b"no".startswith(pieces[t]) for t in matcher.allowed())
    text = b""
    while not matcher.finished:  # always take the longest allowed piece
        token = max(matcher.allowed(), key=lambda t: len(pieces[t] or b""))
        text += pieces[token]
        matcher.advance(token)
    assert text in (b"yes", b"no") and matcher.allowed() == [tokenizer.eos_id]
    with pytest.raises(GrammarError):
        compiler.matcher(r"(yes|no)").advance(tokenizer.encode("maybe")[0])


def test_compile_is_cached_and_refuses_empty_languages(compiler):
    assert compiler.compile(r"\d{2}") is compiler.compile(r"\d{2}")
    with pytest.raises(GrammarError, match="no text"):
        compiler.compile(r"()")
    with pytest.raises(GrammarError, match="cannot be compiled"):
        compiler.compile(r"a[")


def test_schema_regex_accepts_exactly_the_valid_documents(compiler):
    regex = structured.schema_regex(SCHEMA, "f")
    assert re.fullmatch(regex, json.dumps({"name": "ab", "ok": True, "color": "red"}))
    assert re.fullmatch(regex, '{"name":"x","ok":false,"color":"green"}')
    assert not re.fullmatch(regex, '{"name":"toolongname","ok":false,"color":"green"}')
    assert not re.fullmatch(regex, '{"name":"x","ok":false,"color":"blue"}')
    compiler.compile(regex)


@pytest.mark.parametrize("extra, field", [
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"response_format": "json"}, "response_format"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"not": {}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"structured_outputs": {"regex": ""}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "x"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "json": {}}}, "structured_outputs"),
    ({"structured_outputs": {"json": {"type": 5}}}, "structured_outputs.json"),
])
def test_structured_output_refusals_name_the_field(extra, field):
    body = {"prompt": "hi", **extra}
    with pytest.raises(ApiError) as info:
        protocol.parse_completion(body, protocol.ModelInfo("m", 64, 1000, 2), CharTokenizer())
    assert info.value.kind == "invalid_request" and info.value.param == field, info.value.message


def test_structured_output_fields_become_a_regex():
    model, tok = protocol.ModelInfo("m", 64, 1000, 2), CharTokenizer()
    p = protocol.parse_completion({"prompt": "hi", "structured_outputs": {"regex": r"\d+"}}, model, tok)
    assert (p.grammar, p.grammar_field) == (r"\d+", "structured_outputs")
    chat = {"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}
    p = protocol.parse_chat(chat, model, tok)
    assert p.grammar_field == "response_format" and re.fullmatch(p.grammar, '{"a": [1, "x"], "b": {"c": null}}')
    assert protocol.parse_chat({**chat, "response_format": {"type": "text"}}, model, tok).grammar is None
