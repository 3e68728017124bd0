"""A load generator: `concurrency` streams send `requests` requests in all, over HTTP, gRPC, or straight to a
router actor; reports TTFT and TPOT (p50/p99) and output tokens/s. Used by `grok1 bench` and
benchmarks/bench_serve.py.

Prompts are random token ids of exactly `prompt_len` (seeded), and requests set ignore_eos so that every one
generates exactly `output_len` tokens: the three paths do the same work.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import threading
import time
from dataclasses import asdict, dataclass, field

from ingress.metrics import quantile


@dataclass
class LoadSpec:
    concurrency: int = 32
    requests: int = 64
    prompt_len: int = 16
    output_len: int = 32
    vocab_size: int = 131072
    seed: int = 0

    def prompts(self) -> list[list[int]]:
        rng = random.Random(self.seed)
        # ids from 1000 up: skips SentencePiece's control and byte pieces
        return [[rng.randrange(1000, self.vocab_size) for _ in range(self.prompt_len)] for _ in range(self.requests)]


@dataclass
class LoadResult:
    path: str
    spec: LoadSpec
    wall_s: float
    output_tokens: int
    errors: int
    ttft_s: list[float] = field(default_factory=list, repr=False)
    tpot_s: list[float] = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict:
        return {"path": self.path, **{k: v for k, v in asdict(self.spec).items() if k != "vocab_size"},
                "wall_s": round(self.wall_s, 3), "output_tokens": self.output_tokens, "errors": self.errors,
                "tokens_per_s": round(self.tokens_per_s, 1),
                "ttft_p50_ms": round(1000 * quantile(self.ttft_s, 0.5), 1) if self.ttft_s else None,
                "ttft_p99_ms": round(1000 * quantile(self.ttft_s, 0.99), 1) if self.ttft_s else None,
                "tpot_p50_ms": round(1000 * quantile(self.tpot_s, 0.5), 2) if self.tpot_s else None,
                "tpot_p99_ms": round(1000 * quantile(self.tpot_s, 0.99), 2) if self.tpot_s else None}


class _Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.ttft, self.tpot, self.tokens, self.errors = [], [], 0, 0

    def add(self, start: float, times: list[float], ok: bool) -> None:
        with self.lock:
            if not ok:
                self.errors += 1
            self.tokens += len(times)
            if times:
                self.ttft.append(times[0] - start)
                if len(times) > 1:
                    self.tpot.append((times[-1] - times[0]) / (len(times) - 1))


def _run_threads(path: str, spec: LoadSpec, one) -> LoadResult:
    """`one(prompt)` yields the number of tokens in each chunk it receives."""
    prompts = spec.prompts()
    tally = _Tally()
    next_index = iter(range(len(prompts)))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                k = next(next_index, None)
            if k is None:
                return
            start, times, ok = time.perf_counter(), [], True
            try:
                for n in one(prompts[k]):
                    now = time.perf_counter()
                    times.extend([now] * n)
            except Exception:  # noqa: BLE001 - counted; the bench goes on
                ok = False
            tally.add(start, times, ok)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(spec.concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(spec.concurrency)]:
            future.result()
    return LoadResult(path, spec, time.perf_counter() - started, tally.tokens, tally.errors, tally.ttft, tally.tpot)


def run_http(base_url: str, spec: LoadSpec) -> LoadResult:
    import json

    import requests

    local = threading.local()

    def one(prompt):
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        body = {"prompt": prompt, "max_tokens": spec.output_len, "stream": True, "ignore_eos": True,
                "stream_options": {"include_usage": True}}
        chunks = 0
        with session.post(f"{base_url.rstrip('/')}/v1/completions", json=body, stream=True, timeout=600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if line.startswith(b"data: {"):
                    data = json.loads(line[6:])
                    if "error" in data:
                        raise RuntimeError(data["error"]["message"])
                    if data["choices"]:  # a chunk carries one token or more (its text may be held back: empty)
                        chunks += 1
                        yield 1
                    elif data.get("usage"):  # the last chunk: the tokens the chunks carried beyond one each
                        yield data["usage"]["completion_tokens"] - chunks

    result = _run_threads("http", spec, one)
    return result


def run_grpc(target: str, spec: LoadSpec) -> LoadResult:
    import grpc

    from grok1_api.v1 import grok1_pb2 as pb
    from grok1_api.v1 import grok1_pb2_grpc

    channel = grpc.insecure_channel(target)
    stub = grok1_pb2_grpc.Grok1ServiceStub(channel)

    def one(prompt):
        request = pb.GenerateRequest(tokens=pb.TokenIds(ids=prompt), max_tokens=spec.output_len, ignore_eos=True)
        for chunk in stub.GenerateStream(request, timeout=600):
            if chunk.token_ids:
                yield len(chunk.token_ids)

    try:
        return _run_threads("grpc", spec, one)
    finally:
        channel.close()


def run_router(router, spec: LoadSpec) -> LoadResult:
    """The same load straight on a router actor (asyncio in this process): the baseline for the ingress."""
    from cluster.scheduler import Request

    prompts = spec.prompts()
    tally = _Tally()

    async def main():
        queue = list(enumerate(prompts))

        async def worker():
            while queue:
                k, prompt = queue.pop()
                start, times, ok = time.perf_counter(), [], True
                try:
                    refs = router.generate.options(num_returns="streaming").remote(
                        Request(f"bench-{k}-{time.monotonic_ns()}", prompt, spec.output_len, ignore_eos=True))
                    async for ref in refs:
                        for event in await ref:  # a list: the events since the last read
                            if event.token is not None:
                                times.append(time.perf_counter())
                            if event.finish_reason and event.finish_reason not in ("stop", "length"):
                                ok = False
                except Exception:  # noqa: BLE001
                    ok = False
                tally.add(start, times, ok)

        await asyncio.gather(*(worker() for _ in range(spec.concurrency)))

    started = time.perf_counter()
    asyncio.run(main())
    return LoadResult("router", spec, time.perf_counter() - started, tally.tokens, tally.errors, tally.ttft,
                      tally.tpot)


def format_table(results: list[LoadResult], baseline: LoadResult | None = None) -> str:
    head = f"{'path':<8} {'streams':>7} {'reqs':>5} {'tok/s':>8} {'ratio':>6} {'TTFT p50/p99 ms':>17} " \
           f"{'TPOT p50/p99 ms':>17} {'errors':>6}"
    lines = [head]
    for r in results:
        s = r.summary()
        ratio = f"{r.tokens_per_s / baseline.tokens_per_s:.0%}" if baseline and baseline.tokens_per_s else "-"
        lines.append(f"{r.path:<8} {r.spec.concurrency:>7} {r.spec.requests:>5} {r.tokens_per_s:>8.1f} {ratio:>6} "
                     f"{s['ttft_p50_ms']!s:>8}/{s['ttft_p99_ms']!s:<8} {s['tpot_p50_ms']!s:>8}/{s['tpot_p99_ms']!s:<8} "
                     f"{r.errors:>6}")
    return "\n".join(lines)
