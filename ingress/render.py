"""OpenAI response bodies and stream chunks for /v1/completions and /v1/chat/completions, built from the
`Delta`s of a Generation (ingress/generation.py). Pure: no Ray, no web framework.

Echo puts the prompt's text before each choice's text (in a stream: as the first chunk of each choice); with
logprobs the prompt's tokens come first in the choice's logprobs (in a stream: on the choice's first token).
Choice i belongs to prompt i // n.
"""

from __future__ import annotations

import time

from ingress import protocol, responses


class CompletionRender:
    def __init__(self, params: protocol.GenerationParams, request_id: str, model: str):
        self.params = params
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())

    def _echo(self, index: int) -> str:
        return self.params.prompt_texts[index // self.params.n] or "" if self.params.echo else ""

    @staticmethod
    def _pieces(delta) -> list:
        return list(zip(delta.token_texts, delta.logprobs, delta.text_offsets,
                        delta.top_logprobs or [[] for _ in delta.token_texts]))

    def _logprobs(self, delta, with_echo: bool):
        if self.params.logprobs is None:
            return None
        pieces = self._pieces(delta)
        if with_echo and self.params.echo:
            shift = len(self._echo(delta.index))
            pieces = list(delta.prompt_pieces or []) + [(t, lp, off + shift, top) for t, lp, off, top in pieces]
        return responses.completion_logprobs(pieces)

    def first_chunks(self):
        if self.params.echo:  # the prompt, once per choice, before any generated text
            for i in range(self.params.choices):
                yield self._chunk(i, self._echo(i), None, None)

    def _chunk(self, index, text, logprobs, finish_reason, usage=None):
        chunk = {"id": self.request_id, "object": "text_completion", "created": self.created, "model": self.model,
                 "choices": [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}]}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def chunk(self, delta, usage=None):
        return self._chunk(delta.index, delta.text, self._logprobs(delta, True), delta.finish_reason, usage)

    def usage_chunk(self, usage):
        return {"id": self.request_id, "object": "text_completion", "created": self.created, "model": self.model,
                "choices": [], "usage": usage}

    def response(self, whole, usage):
        choices = [{"index": d.index, "text": self._echo(d.index) + d.text, "logprobs": self._logprobs(d, True),
                    "finish_reason": d.finish_reason} for d in whole]
        return responses.completion_response(self.request_id, self.model, choices, usage)


class ChatRender(CompletionRender):
    def _logprobs(self, delta, with_echo: bool):
        if self.params.logprobs is None:
            return None
        return responses.chat_logprobs(self._pieces(delta))

    def _base(self):
        return {"id": self.request_id, "object": "chat.completion.chunk", "created": self.created,
                "model": self.model}

    def first_chunks(self):
        for i in range(self.params.choices):
            yield {**self._base(), "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                "logprobs": None, "finish_reason": None}]}

    def chunk(self, delta, usage=None):
        chunk = {**self._base(), "choices": [{
            "index": delta.index, "delta": {"content": delta.text} if delta.text else {},
            "logprobs": self._logprobs(delta, False), "finish_reason": delta.finish_reason}]}
        if usage is not None:
            chunk["usage"] = usage
        return chunk

    def usage_chunk(self, usage):
        return {**self._base(), "choices": [], "usage": usage}

    def response(self, whole, usage):
        choices = [{"index": d.index, "message": {"role": "assistant", "content": d.text},
                    "logprobs": self._logprobs(d, False), "finish_reason": d.finish_reason} for d in whole]
        return responses.chat_response(self.request_id, self.model, choices, usage)
