"""The ingress's side of a request (ingress/generation.py) on a scripted router: the router streams each request's
events in lists (all of a step's, or everything since the last read), and one list becomes one Delta.

The fake router hands out, per request, the lists given in the script, through the same calls the ingress makes
on a Ray actor handle (`generate.options(num_returns="streaming").remote(...)`, each item awaited like a Ray ref;
`cancel.remote(id)`). Tokens are characters (test_ingress.CharTokenizer), so the text is exact.
"""

from __future__ import annotations

import asyncio

import pytest

from grok1.engine_api import TokenEvent
from ingress.errors import ApiError
from ingress.generation import Generation
from ingress.protocol import GenerationParams
from tests.serving.fakes import TOK


def events(text: str, finish: str | None = None, error: str | None = None) -> list[TokenEvent]:
    """One event per character of `text`; `finish` on the last (or on an extra token-less event if no text
    would carry it: a deadline or an error)."""
    out = [TokenEvent("r", ord(c), -0.5, None) for c in text]
    if finish in ("length", "stop") and out:
        out[-1].finish_reason = finish
    elif finish is not None:
        out.append(TokenEvent("r", None, None, finish, error))
    return out


class _Ref:
    def __init__(self, value):
        self.value = value

    def __await__(self):
        yield from asyncio.sleep(0).__await__()
        return self.value


class _Refs:
    def __init__(self, batches):
        self.batches = list(batches)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.batches:
            raise StopAsyncIteration
        return _Ref(self.batches.pop(0))


class ScriptedRouter:
    """`script`: the lists of events each router request gets, in order of the requests."""

    def __init__(self, *script):
        self.script = list(script)
        self.cancelled: list[str] = []
        router = self

        class _Generate:
            def options(self, **kwargs):
                assert kwargs == {"num_returns": "streaming"}
                return self

            def remote(self, request, timeout_s=None):
                return _Refs(router.script.pop(0))

        class _Cancel:
            def remote(self, request_id):
                router.cancelled.append(request_id)

        self.generate, self.cancel = _Generate(), _Cancel()


def deltas(router, **params):
    async def main():
        generation = await Generation(router, TOK, GenerationParams([ord(c) for c in "ab"], **params), "id").start()
        return generation, [delta async for delta in generation.deltas()]

    return asyncio.run(asyncio.wait_for(main(), 10))


def test_each_list_of_events_becomes_one_delta_in_order():
    router = ScriptedRouter([events("H"), events("ello"), events(" world", "length")])
    generation, out = deltas(router, max_tokens=11)
    assert [d.text for d in out] == ["H", "ello", " world"]
    assert [d.token_ids for d in out] == [[ord("H")], [ord(c) for c in "ello"], [ord(c) for c in " world"]]
    assert [d.finish_reason for d in out] == [None, None, "length"]
    assert generation.completion_tokens == 11 and router.cancelled == []


def test_a_stop_string_inside_a_list_ends_the_choice_there_and_cancels_the_request():
    router = ScriptedRouter([events("x"), events("yzSTOPmore")])
    generation, out = deltas(router, max_tokens=20, stop=["STOP"])
    assert "".join(d.text for d in out) == "xyz" and out[-1].finish_reason == "stop"
    assert generation.completion_tokens == len("xyzSTOP")  # the tokens after the stop string are not taken
    assert len(router.cancelled) == 1


def test_logprobs_and_offsets_of_a_list_line_up_with_its_tokens():
    router = ScriptedRouter([events("ab"), events("cd", "length")])
    _, out = deltas(router, max_tokens=4, logprobs=0)
    assert [d.token_texts for d in out] == [["a", "b"], ["c", "d"]]
    assert [d.text_offsets for d in out] == [[0, 1], [2, 3]] and out[1].logprobs == [-0.5, -0.5]


@pytest.mark.parametrize("finish,kind", [("deadline", "deadline"), ("error", "unavailable")])
def test_tokens_before_a_deadline_or_an_error_in_the_same_list_still_go_out_first(finish, kind):
    router = ScriptedRouter([events("a"), events("bc", finish, error="shard failed")])
    seen = []

    async def main():
        generation = await Generation(router, TOK, GenerationParams([1], max_tokens=9, timeout_s=1.0), "id").start()
        async for delta in generation.deltas():
            seen.append(delta.text)

    with pytest.raises(ApiError) as err:
        asyncio.run(asyncio.wait_for(main(), 10))
    assert err.value.kind == kind and seen == ["a", "bc"]


def test_a_stream_interval_sends_the_first_token_at_once_then_chunks_of_that_many_tokens():
    router = ScriptedRouter([events(c) for c in "abcdefg"] + [events("h", "length")])
    generation, out = deltas(router, max_tokens=8, logprobs=0)
    assert [d.text for d in out] == list("abcdefgh")  # interval 1 (the default): as before
    router = ScriptedRouter([events(c) for c in "abcdefg"] + [events("h", "length")])

    async def main():
        params = GenerationParams([ord(c) for c in "ab"], max_tokens=8, logprobs=0)
        generation = await Generation(router, TOK, params, "id", stream_interval=3).start()
        return [delta async for delta in generation.deltas()]

    out = asyncio.run(asyncio.wait_for(main(), 10))
    assert [d.text for d in out] == ["a", "bcd", "efg", "h"]  # the last chunk: whatever the finish leaves
    assert [d.finish_reason for d in out] == [None, None, None, "length"]
    assert [d.token_ids for d in out][1] == [ord(c) for c in "bcd"]
    assert [d.text_offsets for d in out] == [[0], [1, 2, 3], [4, 5, 6], [7]]
    assert [d.token_texts for d in out][2] == list("efg") and all(len(d.logprobs) == len(d.token_ids) for d in out)


def test_a_stream_interval_keeps_lists_whole_and_lets_held_tokens_out_before_an_error():
    router = ScriptedRouter([events("abcde"), events("f"), events("g", "error", error="shard failed")])
    seen = []

    async def main():
        generation = await Generation(router, TOK, GenerationParams([1], max_tokens=9), "id",
                                      stream_interval=4).start()
        async for delta in generation.deltas():
            seen.append(delta.text)

    with pytest.raises(ApiError) as err:
        asyncio.run(asyncio.wait_for(main(), 10))
    # the first list goes out whole (it holds the first token); "f" and "g" are held, then sent before the error
    assert err.value.kind == "unavailable" and seen == ["abcde", "fg"]


def test_a_stream_interval_below_one_is_refused():
    with pytest.raises(ValueError, match="stream_interval"):
        Generation(ScriptedRouter(), TOK, GenerationParams([1], max_tokens=1), "id", stream_interval=0)
