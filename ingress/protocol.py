"""OpenAI-compatible request parsing, with no Ray and no web framework (pure, tested alone). The JSON body and
its typed field readers are ingress/fields.py's; the response shapes ingress/responses.py's.

Requests become a `GenerationParams`: token ids, sampling, stop strings, n, logprobs, echo. Range checks on
the prompt, max_tokens and sampling are the scheduler's own `validate` (one source of truth for what the
router accepts); what is text- or HTTP-specific is checked here. Every problem is an `ApiError` naming the
field.

Decisions, documented in the README:
- Chat: Grok-1 is a base model without a chat format, so messages are laid out as plain text
  (`render_chat`) ending in "Assistant:", and "\\nUser:" is added to the stop strings.
- n: up to MAX_N choices, each its own request to the router with seed + i (they batch together in the
  decode slots; the prompt is prefilled once per choice).
- A list of prompts (completions) gives each prompt its n choices: choice index = prompt index * n + i, as
  OpenAI numbers them; usage counts each prompt once.
- logprobs: k (0..MAX_LOGPROBS) most likely tokens per position from the distribution that was sampled;
  with echo, prompt tokens too (the first one null). `max_tokens: 0` with echo scores a text (no generation).
- Structured output (response_format, structured_outputs): ingress/structured.py, as a regex.
- At most MAX_STOP stop strings.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from grok1.engine_api import InvalidRequest, Request, Sampling, validate_request
from grok1.limits import (
    LOGIT_BIAS_RANGE,
    MAX_LOGIT_BIAS,
    MAX_TIMEOUT_S,
    MAX_TOP_LOGPROBS,
    PENALTY_RANGE,
    SEED_RANGE,
    TEMPERATURE_MAX,
    TOP_K_MAX,
)
from ingress.errors import ApiError, invalid
from ingress.fields import MAX_BODY_BYTES, boolean, check_text, integer, number, show
from ingress.structured import grammar_of

MAX_N = 8
MAX_PROMPTS = 32  # prompts in one completions request (evaluation harnesses batch theirs)
MAX_CHOICES = 64  # prompts x n: each choice is one router request
MAX_STOP = 4
MAX_STOP_CHARS = 256  # the text hold-back and stop search cost grows with it, per token
MAX_LOGPROBS = MAX_TOP_LOGPROBS
CHARS_PER_TOKEN = 16  # a text prompt may have at most max_len * this many characters (tokenising is CPU work)
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_CHAT_MAX_TOKENS = 256  # capped at the context left after the prompt
CHAT_STOP = "\nUser:"
ROLES = {"system": None, "user": "User", "assistant": "Assistant"}


@dataclass
class ModelInfo:
    """What parsing needs to know about the served model."""

    name: str
    max_len: int
    vocab_size: int
    eos_token: int

    @property
    def max_prompt_chars(self) -> int:
        return self.max_len * CHARS_PER_TOKEN


@dataclass
class GenerationParams:
    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    n: int = 1
    logprobs: int | None = None  # None: not asked for; k: the k most likely tokens at each position
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    timeout_s: float | None = None
    ignore_eos: bool = False  # an extension (as in vLLM): generate exactly max_tokens tokens (benchmarks)
    prompt_text: str | None = None  # the prompt as text (for echo), when known
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    prompts: list[list[int]] = field(default_factory=list)  # all prompts (completions may send several)
    prompt_texts: list[str | None] = field(default_factory=list)
    grammar: str | None = None  # a regex the generated text must match (structured output)
    grammar_field: str | None = None  # the request field it came from (for errors)

    def __post_init__(self):
        if not self.prompts:
            self.prompts = [self.prompt]
            self.prompt_texts = [self.prompt_text]

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n

    @property
    def score_only(self) -> bool:
        """max_tokens 0 with echo: the prompt's logprobs, nothing generated (one token is, and dropped)."""
        return self.max_tokens == 0


# Parameters each route implements (OpenAI's, and our extensions timeout_s, ignore_eos, top_k). `user` is an
# end-user id for abuse tracking: accepted and not used for generation.
_SHARED_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
                            "stream_options", "user", "timeout_s", "ignore_eos", "presence_penalty",
                            "frequency_penalty", "logit_bias", "logprobs", "response_format",
                            "structured_outputs"})
COMPLETION_FIELDS = _SHARED_FIELDS | {"prompt", "echo"}
CHAT_FIELDS = _SHARED_FIELDS | {"messages", "max_completion_tokens", "top_logprobs"}
# OpenAI parameters we do not implement, with the values that ask for nothing (accepted as such).
UNSUPPORTED = {
    "best_of": (None, 1), "suffix": (None, ""),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
    "parallel_tool_calls": (None,), "audio": (None,), "modalities": (None, ["text"]), "prediction": (None,),
    "reasoning_effort": (None,), "service_tier": (None, "auto", "default"), "store": (None, False),
    "metadata": (None, {}), "web_search_options": (None,),
}


# ------------------------------------------------------------------------------------------- fields


def check_fields(body: dict, known: frozenset[str], route: str) -> None:
    """OpenAI parameters we do not implement are refused by name, never silently ignored (nor are typos)."""
    for name, value in body.items():
        if name in known:
            continue
        if name in UNSUPPORTED and value in UNSUPPORTED[name]:
            continue  # the parameter's neutral value (e.g. best_of 1, an empty tool list) asks for nothing
        if name in UNSUPPORTED:
            raise invalid(f"{name} is not supported by this server", name)
        raise invalid(f"unknown parameter {show(name)} for {route}", str(name)[:64])


def _stop(body) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid("stop must be a string or a list of strings", "stop")
    if len(stops) > MAX_STOP:
        raise invalid(f"at most {MAX_STOP} stop strings, got {len(stops)}", "stop")
    return [check_text(s, "stop", MAX_STOP_CHARS) for s in stops if s]


def _logit_bias(body, model: ModelInfo) -> tuple[tuple[int, float], ...]:
    """OpenAI's {"token id": bias} with biases in [-100, 100], at most MAX_LOGIT_BIAS entries."""
    value = body.get("logit_bias")
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise invalid("logit_bias must be an object mapping token ids to biases", "logit_bias")
    if len(value) > MAX_LOGIT_BIAS:
        raise invalid(f"logit_bias has {len(value)} entries; the limit is {MAX_LOGIT_BIAS}", "logit_bias")
    entries = []
    for key, bias in value.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) <= 10
                and int(key) < model.vocab_size):
            raise invalid(f"logit_bias keys must be token ids in [0, {model.vocab_size}), got {show(key)}",
                          "logit_bias")
        entries.append((int(key), number({"logit_bias": bias}, "logit_bias", 0.0, *LOGIT_BIAS_RANGE)))
    return tuple(sorted(entries))


def check_model(body: dict, model: ModelInfo) -> None:
    name = body.get("model")
    if name is not None and name != model.name:
        raise ApiError("model_not_found", f"the model {show(name)} does not exist; this server "
                                          f"serves {model.name!r} (GET /v1/models)", "model")


def _common(body: dict, model: ModelInfo, prompts: list[list[int]], default_max_tokens: int,
            score_only_ok: bool = False) -> GenerationParams:
    check_model(body, model)
    max_tokens = integer(body, "max_tokens", None, 0 if score_only_ok else 1, model.max_len)
    if max_tokens is None:
        max_tokens = integer(body, "max_completion_tokens", None, 1, model.max_len)
    if max_tokens is None:
        max_tokens = max(1, min(default_max_tokens, model.max_len - max(len(p) for p in prompts)))
    if max_tokens == 0 and not boolean(body, "echo"):
        raise invalid("max_tokens 0 generates nothing: it needs echo: true (to score the prompt)", "max_tokens")
    n = integer(body, "n", 1, 1, MAX_N)
    if n * len(prompts) > MAX_CHOICES:
        raise invalid(f"{len(prompts)} prompts x n {n} is over {MAX_CHOICES} choices", "n")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise invalid("stream_options must be an object", "stream_options")
    params = GenerationParams(
        prompt=prompts[0], prompts=prompts, max_tokens=max_tokens,
        temperature=number(body, "temperature", 0.0, 0.0, TEMPERATURE_MAX),
        top_p=number(body, "top_p", 1.0, 0.0, 1.0), top_k=integer(body, "top_k", 0, 0, TOP_K_MAX),
        seed=integer(body, "seed", 0, *SEED_RANGE), stop=_stop(body), n=n,
        stream=boolean(body, "stream"), include_usage=boolean(stream_options, "include_usage"),
        timeout_s=number(body, "timeout_s", None, 0.0, MAX_TIMEOUT_S), ignore_eos=boolean(body, "ignore_eos"),
        presence_penalty=number(body, "presence_penalty", 0.0, *PENALTY_RANGE),
        frequency_penalty=number(body, "frequency_penalty", 0.0, *PENALTY_RANGE),
        logit_bias=_logit_bias(body, model))
    params.grammar, params.grammar_field = grammar_of(body)
    if params.grammar is not None and params.score_only:
        raise invalid("a structured output needs max_tokens of at least 1", "max_tokens")
    if params.timeout_s is not None and params.timeout_s <= 0:
        raise invalid(f"timeout_s must be positive, got {params.timeout_s}", "timeout_s")
    validate(params, model)
    return params


def choice_seed(seed: int, index: int) -> int:
    """Choice i of n samples with seed + i, wrapped into int64 (a seed near 2**63 must not overflow)."""
    return (seed + index + 2 ** 63) % 2 ** 64 - 2 ** 63


def sampling(params: GenerationParams, index: int = 0):
    """The engine's sampling settings for choice `index`."""
    return Sampling(params.temperature, params.top_p, params.top_k, choice_seed(params.seed, index),
                    presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                    logit_bias=params.logit_bias, top_logprobs=params.logprobs or 0,
                    prompt_logprobs=params.echo and params.logprobs is not None,
                    logprobs=params.logprobs is not None)


def router_max_tokens(params: GenerationParams) -> int:
    """What the router is asked for: a score-only request generates one token, which is dropped."""
    return max(1, params.max_tokens)


def validate(params: GenerationParams, model: ModelInfo) -> None:
    """The scheduler's checks (prompt, context, vocabulary, sampling ranges), as an ApiError naming the field."""
    try:
        for prompt in params.prompts:
            validate_request(Request("validate", prompt, router_max_tokens(params), sampling(params)),
                             model.max_len, model.vocab_size)
    except InvalidRequest as err:
        raise invalid(str(err), err.field) from None


def _prompt_list(value, tokenizer, model: ModelInfo) -> list[tuple[list[int], str | None]]:
    """OpenAI's prompt: a text, token ids, or a list of either (several prompts)."""
    if isinstance(value, list) and value and all(isinstance(p, (str, list)) for p in value):
        if len(value) > MAX_PROMPTS:
            raise invalid(f"prompt has {len(value)} prompts; the limit is {MAX_PROMPTS}", "prompt")
        return [_prompt_ids(p, tokenizer, model) for p in value]
    return [_prompt_ids(value, tokenizer, model)]


def _prompt_ids(value, tokenizer, model: ModelInfo) -> tuple[list[int], str | None]:
    """One prompt given as text or as token ids."""
    if isinstance(value, str):
        return tokenizer.encode(check_text(value, "prompt", model.max_prompt_chars)), value
    if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        if len(value) > model.max_len:
            raise invalid(f"the prompt has {len(value)} tokens, which exceeds the context of {model.max_len}",
                          "prompt")
        if any(not 0 <= t < model.vocab_size for t in value):
            raise invalid(f"token ids must be in [0, {model.vocab_size})", "prompt")
        return list(value), None
    raise invalid("prompt must be a string or a list of token ids", "prompt")


def parse_completion(body: dict, model: ModelInfo, tokenizer) -> GenerationParams:
    check_fields(body, COMPLETION_FIELDS, "/v1/completions")
    if "prompt" not in body:
        raise invalid("prompt is required", "prompt")
    prompts = _prompt_list(body["prompt"], tokenizer, model)
    params = _common(body, model, [ids for ids, _ in prompts], DEFAULT_MAX_TOKENS, score_only_ok=True)
    params.logprobs = integer(body, "logprobs", None, 0, MAX_LOGPROBS)
    params.echo = boolean(body, "echo")
    params.prompt_texts = [text if text is not None else (tokenizer.decode(ids) if params.echo else None)
                           for ids, text in prompts]
    params.prompt_text = params.prompt_texts[0]
    return params


def render_chat(messages, max_chars: int = MAX_BODY_BYTES) -> str:
    """Grok-1 has no chat format; this plain layout is ours (README, "Serving"). In message order:

        <system message>\n\n
        User: <user message>\n\n
        Assistant: <assistant message>\n\n
        ...
        Assistant:

    (contents stripped of surrounding whitespace; the model continues after "Assistant:").
    """
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list", "messages")
    parts = []
    if len(messages) > max_chars // 8:
        raise invalid(f"messages has {len(messages)} entries; the limit is {max_chars // 8}", "messages")
    total = 0
    for k, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            raise invalid(f"messages[{k}] must be an object with role 'system', 'user' or 'assistant'",
                          "messages")
        extra = sorted(set(message) - {"role", "content"})
        if extra:
            raise invalid(f"messages[{k}].{show(extra[0])} is not supported by this server", "messages")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                       for c in content):
                raise invalid(f"messages[{k}].content: only text parts are supported", "messages")
            content = "".join(c["text"] for c in content)
        if not isinstance(content, str):
            raise invalid(f"messages[{k}].content must be a string", "messages")
        total += len(check_text(content, f"messages[{k}].content", max_chars))
        if total > max_chars:
            raise invalid(f"the messages have over {max_chars} characters", "messages")
        speaker = ROLES[message["role"]]
        parts.append(f"{content.strip()}\n\n" if speaker is None else f"{speaker}: {content.strip()}\n\n")
    return "".join(parts) + "Assistant:"


def parse_chat(body: dict, model: ModelInfo, tokenizer) -> GenerationParams:
    check_fields(body, CHAT_FIELDS, "/v1/chat/completions")
    text = render_chat(body.get("messages"), model.max_prompt_chars)
    prompt = tokenizer.encode(text)
    params = _common(body, model, [prompt], DEFAULT_CHAT_MAX_TOKENS)
    params.stop = params.stop + [CHAT_STOP] if CHAT_STOP not in params.stop else params.stop
    top = integer(body, "top_logprobs", None, 0, MAX_LOGPROBS)
    if boolean(body, "logprobs"):
        params.logprobs = top or 0
    elif top is not None:
        raise invalid("top_logprobs needs logprobs: true", "top_logprobs")
    params.prompt_text = text
    params.prompt_texts = [text]
    return params


def new_id(prefix: str) -> str:
    """A fresh id for a response or a router request (never the client's: see ingress/generation.py)."""
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


