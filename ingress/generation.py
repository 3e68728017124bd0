"""One client request carried out against the router; HTTP and gRPC both go through here.

1. `start()` submits one router request per choice (n of them, seeds seed, seed+1, ...) and waits for each
   one's first event, so that refusals (InvalidRequest, QueueFull, Unavailable) arrive as an `ApiError`
   before anything is sent to the client: HTTP can still answer 400 / 429 / 503, gRPC its status code.
2. Iterating yields `Delta`s: new text (stop strings cut, partial characters held back: ingress/text.py),
   the new token ids and their logprobs, and on the last one of each choice its finish_reason. The router
   streams each request's events in lists (all of a step's, or all since the last read when this replica
   falls behind); one list becomes one Delta, so a busy replica sends fewer, larger chunks rather than
   falling further behind.
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
    finish_reason: str | None = None


class _Choice:
    def __init__(self, generation: "Generation", index: int):
        params = generation.params
        self.generation = generation
        self.index = index
        # The router's id is ours, never the client's: a client reusing an id (its own or another client's)
        # must not be able to collide with, or cancel, a running request.
        self.request_id = protocol.new_id("r")
        request = Request(self.request_id, list(params.prompt), params.max_tokens, protocol.sampling(params, index),
                          ignore_eos=params.ignore_eos)
        self.refs = generation.router.generate.options(num_returns="streaming").remote(
            request, timeout_s=params.timeout_s)
        self.text = TextStream(generation.tokenizer, params.prompt, params.stop)
        self.first: list | None = None  # the first list of events, read by start()
        self.tokens = 0
        self.finished = False

    async def next_batch(self) -> list:
        """The router's next list of TokenEvents for this choice."""
        try:
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
        try:
            while True:
                delta, error = self._delta(batch)
                if delta.finish_reason or delta.text or delta.token_ids:
                    yield delta
                if error is not None:  # after the tokens that came before it
                    raise error
                if delta.finish_reason:
                    return
                batch = await self.next_batch()
        finally:
            if not self.finished:
                self.finished = True
                self.generation.cancel(self.request_id)

    def _delta(self, batch: list) -> tuple[Delta, ApiError | None]:
        """One Delta for a list of events, up to the one that ends the choice (and the error it ends with)."""
        delta = Delta(self.index)
        for event in batch:
            try:
                self._add(delta, event)
            except ApiError as error:
                return delta, error
            if delta.finish_reason:
                break
        return delta, None

    def _add(self, delta: Delta, event) -> None:
        if event.token is not None:
            self.tokens += 1
            tokenizer = self.generation.tokenizer
            delta.token_ids.append(event.token)
            delta.logprobs.append(event.logprob)
            if self.generation.params.logprobs is not None:
                delta.text_offsets.append(len(self.text.text))
                delta.token_texts.append(tokenizer.id_to_piece(event.token).replace("\u2581", " "))
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


class Generation:
    def __init__(self, router, tokenizer, params: GenerationParams, request_id: str):
        self.router = router
        self.tokenizer = tokenizer
        self.params = params
        self.request_id = request_id
        self.choices: list[_Choice] = []

    @property
    def prompt_tokens(self) -> int:
        return len(self.params.prompt)

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices)

    def cancel(self, request_id: str) -> None:
        self.router.cancel.remote(request_id)  # fire and forget: the slot is freed within one step

    async def start(self) -> "Generation":
        self.choices = [_Choice(self, i) for i in range(self.params.n)]
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
            whole = merged[delta.index]
            whole.text += delta.text
            whole.token_ids += delta.token_ids
            whole.logprobs += delta.logprobs
            whole.token_texts += delta.token_texts
            whole.text_offsets += delta.text_offsets
            whole.finish_reason = delta.finish_reason or whole.finish_reason
        return merged
