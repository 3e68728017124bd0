"""OpenAI-compatible response shapes (completions, chat, models, usage, logprobs) and server-sent events:
plain dicts and bytes, no Ray and no web framework. ingress/render.py fills them from a generation's deltas.
"""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ingress.protocol import ModelInfo


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# A logprobs piece: (token text, logprob or None, text offset, top logprobs [(token text, logprob, id)], ...).
Piece = tuple


def completion_logprobs(pieces: list[Piece]) -> dict:
    """OpenAI's completions logprobs. top_logprobs maps token text -> logprob, most likely first (an empty top
    list, as logprobs: 0 asks, gives the token itself); null where the logprob is (a prompt's first token)."""
    def top(piece):
        if piece[1] is None:
            return None
        return {t: lp for t, lp, *_ in piece[3]} if piece[3] else {piece[0]: piece[1]}
    return {"tokens": [p[0] for p in pieces], "token_logprobs": [p[1] for p in pieces],
            "top_logprobs": [top(p) for p in pieces], "text_offset": [p[2] for p in pieces]}


def chat_logprobs(pieces: list[Piece]) -> dict:
    def entry(token, logprob):
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}
    return {"content": [{**entry(p[0], p[1]), "top_logprobs": [entry(t, lp) for t, lp, *_ in p[3]]}
                        for p in pieces]}


def completion_response(request_id: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}


def chat_response(request_id: str, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage_}


def sse(data) -> bytes:
    """One server-sent event: `data: <json>` and a blank line (`data: [DONE]` for the string '[DONE]')."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"data: {payload}\n\n".encode("utf-8")


SSE_DONE = sse("[DONE]")


def models_response(model: "ModelInfo", created: int) -> dict:
    return {"object": "list", "data": [{"id": model.name, "object": "model", "created": created,
                                        "owned_by": "grok1-serve", "max_model_len": model.max_len}]}
