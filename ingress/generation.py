"""One client request carried out against the router; HTTP and gRPC both go through here.

1. `start()` submits one router request per choice (n per prompt, seeds seed, seed+1, ...; choice index
   prompt index * n + i; through the replica's one subscription to the router, cluster/channel.py, or each
   with its own stream) and waits for each one's first event, so that refusals (InvalidRequest, QueueFull,
   Unavailable) arrive as an `ApiError` before anything is sent to the client: HTTP can still answer
   400 / 429 / 503, gRPC its status code.
2. Iterating yields `Delta`s: new text (stop strings cut, partial characters held back: ingress/text.py),
   the new token ids, their logprobs and top logprobs (token texts), on the first one of each choice the
   prompt's logprobs when echo asked for them, and on the last one its finish_reason (a score-only request,
   max_tokens 0, generates one token, which is dropped). The router
   streams each request's events in lists (all of a step's, or all since the last read when this replica
   falls behind); one list becomes one Delta, so a busy replica sends fewer, larger chunks rather than
   falling further behind. With a stream interval n > 1 (the serving config's `stream_interval`) a choice's
   first token still goes out at once, and after it the Deltas are held until they carry n tokens (or the
   choice ends), so each client chunk, and each message through Serve's proxy, carries n tokens.
3. A stop string ends a choice early: the router is told to cancel it, which frees its slot at the next step.
   So does a client that goes away (the handler's task is cancelled and `close()` runs).
4. Router-side endings that are not a normal finish become errors: "deadline" -> DEADLINE_EXCEEDED / 504,
   "error" (a shard failed; the request may be retried) -> UNAVAILABLE / 503.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from grok1.engine_api import FinishReason, Request
from ingress import protocol
from ingress.errors import ApiError, from_exception
from ingress.protocol import GenerationParams
from ingress.text import TextStream


@dataclass
class Delta:
    index: int  # which choice
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    token_texts: list[str] = field(default_factory=list)  # each token's own text (for logprobs)
    text_offsets: list[int] = field(default_factory=list)  # where each token starts in the choice's text
    # per token: (token text, logprob, token id) of the most likely tokens, most likely first
    top_logprobs: list[list[tuple[str, float, int]]] = field(default_factory=list)
    # per prompt token (echo): (token text, logprob or None, offset in the prompt's text, top logprobs, token id)
    prompt_pieces: list[tuple] | None = None
    finish_reason: str | None = None

    def extend(self, later: "Delta") -> "Delta":
        """This Delta followed by `later` (of the same choice) as one."""
        self.text += later.text
        self.token_ids += later.token_ids
        self.logprobs += later.logprobs
        self.token_texts += later.token_texts
        self.text_offsets += later.text_offsets
        self.top_logprobs += later.top_logprobs
        if later.prompt_pieces is not None:
            self.prompt_pieces = later.prompt_pieces
        self.finish_reason = later.finish_reason or self.finish_reason
        return self


class _Choice:
    def __init__(self, generation: "Generation", index: int):
        params = generation.params
        self.generation = generation
        self.index = index
        # The router's id is ours, never the client's: a client reusing an id (its own or another client's)
        # must not be able to collide with, or cancel, a running request.
        self.request_id = protocol.new_id("r")
        self.prompt = params.prompts[index // params.n]
        request = Request(self.request_id, list(self.prompt), protocol.router_max_tokens(params),
                          protocol.sampling(params, index % params.n), ignore_eos=params.ignore_eos,
                          grammar=generation.grammar)
        self.request = request
        self.refs = None if generation.channel is not None else generation.router.generate.options(
            num_returns="streaming").remote(request, timeout_s=params.timeout_s)
        self.stream = None  # through the channel: this request's Stream, once submitted
        self.text = TextStream(generation.tokenizer, self.prompt, params.stop)
        self.first: list | None = None  # the first list of events, read by start()
        self.tokens = 0
        self.finished = False

    async def next_batch(self) -> list:
        """The router's next list of TokenEvents for this choice."""
        try:
            if self.refs is None:
                if self.stream is None:
                    self.stream = await self.generation.channel.submit(self.request, self.generation.params.timeout_s)
                return await self.stream.next_batch()
            ref = await self.refs.__anext__()
            return await ref
        except StopAsyncIteration:
            raise ApiError("internal", "the router's stream ended without a finish reason") from None
        except ApiError:
            raise
        except Exception as err:  # noqa: BLE001 - mapped to a status: InvalidRequest, QueueFull, Unavailable, ...
            raise from_exception(err) from err

    async def start(self) -> None:
        try:
            self.first = await self.next_batch()
        except ApiError:
            self.finished = True  # refused: the router holds nothing of it to cancel
            raise

    async def deltas(self):
        batch, self.first = self.first, None
        held = Delta(self.index)  # what the next chunk carries (see _due)
        try:
            while True:
                delta, error = self._delta(batch)
                held.extend(delta)
                if error is not None or self._due(held):
                    if held.finish_reason or held.text or held.token_ids or held.prompt_pieces is not None:
                        yield held
                    held = Delta(self.index)
                if error is not None:  # after the tokens that came before it
                    raise error
                if delta.finish_reason:
                    return
                batch = await self.next_batch()
        finally:
            if not self.finished:
                self.finished = True
                self.generation.cancel(self.request_id)

    def _due(self, held: Delta) -> bool:
        """Whether the held Delta goes out now: the choice ended, it holds the choice's first token (sent at
        once, for the time to first token), or it holds `stream_interval` tokens."""
        if held.finish_reason or held.prompt_pieces is not None:
            return True
        if not held.token_ids:
            return False
        first = self.tokens == len(held.token_ids)  # no token of this choice went out before
        return first or len(held.token_ids) >= self.generation.stream_interval

    def _delta(self, batch: list) -> tuple[Delta, ApiError | None]:
        """One Delta for a list of events, up to the one that ends the choice (and the error it ends with)."""
        delta = Delta(self.index)
        for event in batch:
            try:
                self._add(delta, event)
            except ApiError as error:
                return delta, error
            if delta.finish_reason:
                timer = self.generation.timer
                if timer is not None:
                    timer.finish(self.index, delta.finish_reason)
                break
        return delta, None

    def _add(self, delta: Delta, event) -> None:
        timer = self.generation.timer
        params = self.generation.params
        if event.prompt_logprobs is not None:
            delta.prompt_pieces = self._prompt_pieces(event.prompt_logprobs)
        if params.score_only and event.token is not None:
            event.finish_reason = FinishReason.LENGTH  # the one token generated is dropped
        elif event.token is not None:
            self.tokens += 1
            if timer is not None:
                timer.token(self.index)
            delta.token_ids.append(event.token)
            delta.logprobs.append(event.logprob)
            if params.logprobs is not None:
                delta.text_offsets.append(len(self.text.text))
                delta.token_texts.append(self._piece(event.token))
                delta.top_logprobs.append(self._top(event.top_logprobs))
            delta.text += self.text.add(event.token)
        if self.text.stopped:
            delta.finish_reason = FinishReason.STOP.value
            self.generation.cancel(self.request_id)  # the router may still be generating: free the slot
            self.finished = True
        elif event.finish_reason in (FinishReason.STOP, FinishReason.LENGTH):
            delta.text += self.text.finish()
            delta.finish_reason = FinishReason(event.finish_reason).value
            self.finished = True
        elif event.finish_reason == FinishReason.DEADLINE:
            self.finished = True
            raise ApiError("deadline", f"the request ran past its timeout of {self.generation.params.timeout_s}s")
        elif event.finish_reason is not None:  # ERROR: the shard group failed; CANCELLED: not by us
            self.finished = True
            raise ApiError("unavailable", event.error or f"the request ended: {event.finish_reason}; retry it")

    def _piece(self, token: int) -> str:
        return self.generation.tokenizer.id_to_piece(token).replace("\u2581", " ")

    def _top(self, pairs) -> list[tuple[str, float, int]]:
        return [(self._piece(token), logprob, token) for token, logprob in pairs]

    def _prompt_pieces(self, scored) -> list:
        """The prompt's tokens with their logprobs and offsets into the prompt's text as the client sees it."""
        pieces, offset = [], 0
        for k, token in enumerate(self.prompt):
            text = self._piece(token)
            if k == 0:
                text = self.generation.tokenizer.decode([token])  # decoding drops the first token's space
            pieces.append((text, scored.logprobs[k], offset, self._top(scored.top[k]), token))
            offset += len(text)
        return pieces


def compile_grammar(tokenizer, params: GenerationParams):
    """The request's grammar compiled over the tokenizer's vocabulary (cached by regex; about a second for a
    JSON schema the first time, so it runs off the event loop); a grammar no text satisfies is a 400."""
    from grok1.grammar import GrammarCompiler, GrammarError

    try:
        return GrammarCompiler.for_tokenizer(tokenizer).compile(params.grammar)
    except GrammarError as err:
        raise ApiError("invalid_request", f"{params.grammar_field}: {err}", params.grammar_field) from None


class Generation:
    def __init__(self, router, tokenizer, params: GenerationParams, request_id: str, metrics=None, channel=None,
                 stream_interval: int = 1):
        """`metrics` (ingress/metrics.py's ReplicaMetrics) times the request as it streams. With `channel` (the
        replica's cluster.channel.RouterChannel to `router`) the requests stream through its one subscription;
        without, each through its own `Router.generate` stream. `stream_interval`: tokens per Delta after a
        choice's first (fewer when the choice ends)."""
        if stream_interval < 1:
            raise ValueError(f"stream_interval must be at least 1, not {stream_interval}")
        self.stream_interval = stream_interval
        self.router = router
        self.channel = channel
        self.tokenizer = tokenizer
        self.params = params
        self.request_id = request_id
        self.grammar = None  # params.grammar compiled (grok1.grammar) by start()
        self.choices: list[_Choice] = []
        self.timer = metrics.request(len(params.prompt), params.n) if metrics is not None else None

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.params.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def cancel(self, request_id: str) -> None:
        if self.channel is not None:
            self.channel.cancel(request_id)
        else:
            self.router.cancel.remote(request_id)  # fire and forget: the slot is freed within one step

    async def start(self) -> "Generation":
        if self.params.grammar is not None:
            self.grammar = await asyncio.to_thread(compile_grammar, self.tokenizer, self.params)
        self.choices = [_Choice(self, i) for i in range(self.params.choices)]
        try:
            results = await asyncio.gather(*(c.start() for c in self.choices), return_exceptions=True)
        except BaseException:  # the client went away while its request was queued: cancel it there
            self.close()
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self.close()
            raise errors[0]
        return self

    def close(self) -> None:
        for choice in self.choices:
            if not choice.finished:
                choice.finished = True
                self.cancel(choice.request_id)

    async def deltas(self):
        """Deltas of all choices as they come (one choice: in order, without a merging task)."""
        try:
            if len(self.choices) == 1:
                async for delta in self.choices[0].deltas():
                    yield delta
                return
            queue: asyncio.Queue = asyncio.Queue()

            async def pump(choice):
                try:
                    async for delta in choice.deltas():
                        queue.put_nowait(delta)
                    queue.put_nowait(None)
                except BaseException as err:  # noqa: BLE001 - handed to the consumer
                    queue.put_nowait(err)

            tasks = [asyncio.ensure_future(pump(c)) for c in self.choices]
            try:
                done = 0
                while done < len(tasks):
                    item = await queue.get()
                    if item is None:
                        done += 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        yield item
            finally:
                for task in tasks:
                    task.cancel()
        finally:
            self.close()

    async def collect(self) -> list[Delta]:
        """The whole completion: one merged Delta per choice."""
        merged = [Delta(i) for i in range(len(self.choices))]
        async for delta in self.deltas():
            merged[delta.index].extend(delta)
        return merged
