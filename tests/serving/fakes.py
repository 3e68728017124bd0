"""Fast fakes of the engine and the tokenizer for the serving layers' unit tests (scheduler, driver, router,
ingress): arithmetic instead of a model, so the expected tokens can be worked out by hand and no JAX loads.

FakeEngine (contiguous slots; vocabulary of 100, EOS 7):
    first token (prefill) = sum(prompt) % 100
    next token  (decode)  = (last token + 1) % 100, for every active slot; -1 for inactive slots
So prompt [3, 2] gives 5, 6, 7 (EOS), 8, ...; prompt [99] gives 99, 0, 1, ...

FakePagedEngine keeps a simulated device pool: a prefill chunk or a decode token writes its tokens into the
blocks the plan's tables name (after the plan's copies), and each sampled token is a function of the whole
context *as read back through the table*, the request's seed and the token's number n:

    token = (7 * sum(context) + 13 * seed + 3 * n) % 100

So a wrong table, a missed copy-on-write, a shared block overwritten, a recompute that loses a token or a
resumed sequence that restarts its numbering all give other tokens than `reference` (the uninterrupted run).

CharTokenizer: token id = Unicode code point; decode joins characters.
"""

from __future__ import annotations

import numpy as np

from grok1.engine_api import Request, Sampling, StepOutput

VOCAB = 100
EOS = 7


class FakeEngine:
    """The grok1.engine.Engine interface (prefill / decode / release) with arithmetic for a model."""

    def __init__(self, max_slots: int):
        self.max_slots = max_slots
        self.last = np.zeros(max_slots, np.int64)
        self.active = np.zeros(max_slots, bool)
        self.prefills: list[tuple[int, list[int], Sampling]] = []
        self.releases: list[int] = []
        self.decodes = 0

    def prefill(self, slot: int, prompt: list[int], sampling: Sampling) -> StepOutput:
        assert not self.active[slot], f"prefill into slot {slot}, which is still active"
        self.prefills.append((slot, list(prompt), sampling))
        token = sum(prompt) % VOCAB
        self.last[slot] = token
        self.active[slot] = True
        return StepOutput(tokens=np.array([token], np.int32), logprobs=np.array([-0.5], np.float32),
                          expert_counts=np.zeros((1, 8), int))

    def decode(self) -> StepOutput:
        self.decodes += 1
        tokens = np.where(self.active, (self.last + 1) % VOCAB, -1).astype(np.int32)
        self.last = np.where(self.active, tokens, self.last)
        logprobs = np.where(self.active, -0.25, 0.0).astype(np.float32)
        return StepOutput(tokens=tokens, logprobs=logprobs, expert_counts=np.zeros((1, 8), int))

    def release(self, slot: int) -> None:
        self.releases.append(slot)
        self.active[slot] = False

    def slots_of(self, prompt: list[int]) -> list[int]:
        """Slots that prompt was prefilled into, in order."""
        return [slot for slot, p, _ in self.prefills if p == prompt]


def next_token(context, seed: int, n: int) -> int:
    return (7 * sum(context) + 13 * seed + 3 * n) % VOCAB


def reference(request: Request) -> list[int]:
    """The tokens of an uninterrupted run."""
    context, tokens = list(request.prompt), []
    for n in range(request.max_tokens):
        token = next_token(context, request.sampling.seed, n)
        tokens.append(token)
        context.append(token)
        if (token == EOS and not request.ignore_eos) or token in request.stop_token_ids:
            break
    return tokens


class FakePagedEngine:
    """A paged device pool of tokens. With `ranks`, the pool is split as the real engine splits it over ep: it
    fails the step if a slot's table or a copy names a block of another rank's share (memory it cannot read)."""

    def __init__(self, num_blocks: int, block_size: int, max_slots: int, ranks: int = 1):
        self.bs = block_size
        self.per_rank, self.slots_per_rank = num_blocks // ranks, max_slots // ranks
        self.device = [[None] * block_size for _ in range(num_blocks)]
        self.length = [0] * max_slots
        self.last = [0] * max_slots
        self.seed = [0] * max_slots
        self.generated = [0] * max_slots
        self.active = [False] * max_slots
        self.plans = []

    def _write(self, table, position, token):
        self.device[table[position // self.bs]][position % self.bs] = token

    def _read(self, table, upto):
        context = [self.device[table[p // self.bs]][p % self.bs] for p in range(upto)]
        assert None not in context, "read a position nobody wrote"
        return context

    def paged_step(self, plan):
        self.plans.append(plan)
        for slot, table in enumerate(plan.tables):
            mine = {slot // self.slots_per_rank}
            assert {int(b) // self.per_rank for b in table if b >= 0} <= mine, f"slot {slot}: another rank's block"
        for source, destination in plan.copies:
            assert source // self.per_rank == destination // self.per_rank, "a copy across ranks"
            self.device[destination] = list(self.device[source])
        assert set(plan.decode) == {s for s, a in enumerate(self.active) if a}, "decode slots vs active slots"
        decoded = None
        if plan.decode:
            tokens = np.full(len(self.active), -1, np.int32)
            for slot in plan.decode:
                table = plan.tables[slot]
                self._write(table, self.length[slot], self.last[slot])
                self.length[slot] += 1
                token = next_token(self._read(table, self.length[slot]), self.seed[slot], self.generated[slot])
                tokens[slot], self.last[slot] = token, token
                self.generated[slot] += 1
            decoded = StepOutput(tokens, np.full(len(tokens), -0.25, np.float32), np.zeros((1, 8), int))
        for chunk in plan.chunks:  # every chunk writes before any reads, as the layers of one call do
            assert not self.active[chunk.slot]
            for offset, token in enumerate(chunk.tokens):
                if chunk.start + offset >= chunk.write_from:
                    self._write(plan.tables[chunk.slot], chunk.start + offset, token)
        finals = []
        for chunk in plan.chunks:
            if chunk.final:
                end = chunk.start + len(chunk.tokens)
                n = len(chunk.generated)
                token = next_token(self._read(plan.tables[chunk.slot], end), chunk.sampling.seed, n)
                slot = chunk.slot
                self.length[slot], self.last[slot], self.seed[slot] = end, token, chunk.sampling.seed
                self.generated[slot], self.active[slot] = n + 1, True
                finals.append(token)
        prefilled = None
        if finals:
            prefilled = StepOutput(np.asarray(finals, np.int32), np.full(len(finals), -0.5, np.float32),
                                   np.zeros((1, 8), int))
        return decoded, prefilled

    def release(self, slot):
        self.active[slot] = False


class CharTokenizer:
    """Token id = Unicode code point (ids < 1000 here); decode joins characters."""

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def id_to_piece(self, i):
        return chr(i)


TOK = CharTokenizer()
