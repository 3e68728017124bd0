"""A load generator over HTTP, gRPC, or straight to a router actor; reports TTFT, inter-token latency (ITL),
end-to-end latency (E2E) p50/p99, and output tokens/s and requests/s. Used by `grok1 bench` and
benchmarks/bench_serve.py.

Two ways to send load:
- closed loop (`rate` None): `concurrency` streams each send their next request when the last one ends;
- open loop (`rate` requests/s): arrivals are a Poisson process (exponential gaps, seeded), each request is
  sent at its arrival time whether or not earlier ones have finished, as users arrive: latency vs rate.

Prompts are random token ids (seeded); with `spread` 0 every prompt has exactly `prompt_len` tokens and every
request generates exactly `output_len` (ignore_eos), so the paths do the same work; with `spread` s each
request's lengths are uniform in [L(1-s), L(1+s)].
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import random
import threading
import time
from dataclasses import asdict, dataclass, field

MAX_OPEN_LOOP_THREADS = 1024


def quantile(values: list[float], q: float) -> float:
    """Nearest-rank quantile (NaN when there are no samples)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Planned:
    at: float | None  # seconds after the start (open loop), None: as soon as a stream is free
    prompt: list[int]
    output_len: int


@dataclass
class LoadSpec:
    concurrency: int = 32
    requests: int = 64
    prompt_len: int = 16
    output_len: int = 32
    vocab_size: int = 131072
    seed: int = 0
    rate: float | None = None  # requests/s of a Poisson arrival process; None: closed loop
    spread: float = 0.0  # lengths uniform in [L(1-spread), L(1+spread)]

    def __post_init__(self):
        for name in ("concurrency", "requests", "prompt_len", "output_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.rate is not None and not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError(f"rate must be a positive number of requests/s, got {self.rate}")
        if not 0 <= self.spread < 1:
            raise ValueError(f"spread must be in [0, 1), got {self.spread}")

    def _length(self, rng: random.Random, n: int) -> int:
        if not self.spread:
            return n
        return rng.randint(max(1, round(n * (1 - self.spread))), max(1, round(n * (1 + self.spread))))

    def plan(self) -> list[Planned]:
        rng = random.Random(self.seed)
        at, planned = 0.0, []
        for _ in range(self.requests):
            if self.rate is not None:
                at += rng.expovariate(self.rate)
            # ids from 1000 up: skips SentencePiece's control and byte pieces
            prompt = [rng.randrange(1000, self.vocab_size) for _ in range(self._length(rng, self.prompt_len))]
            planned.append(Planned(at if self.rate is not None else None, prompt, self._length(rng, self.output_len)))
        return planned

    def prompts(self) -> list[list[int]]:
        return [p.prompt for p in self.plan()]


def _ms(values: list[float], q: float, digits: int = 1):
    return round(1000 * quantile(values, q), digits) if values else None


@dataclass
class LoadResult:
    path: str
    spec: LoadSpec
    wall_s: float
    output_tokens: int
    errors: int
    ttft_s: list[float] = field(default_factory=list, repr=False)
    tpot_s: list[float] = field(default_factory=list, repr=False)
    itl_s: list[float] = field(default_factory=list, repr=False)
    e2e_s: list[float] = field(default_factory=list, repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def requests_per_s(self) -> float:
        return len(self.e2e_s) / self.wall_s if self.wall_s > 0 else 0.0

    def summary(self) -> dict:
        return {"path": self.path, **{k: v for k, v in asdict(self.spec).items() if k != "vocab_size"},
                "wall_s": round(self.wall_s, 3), "output_tokens": self.output_tokens, "errors": self.errors,
                "tokens_per_s": round(self.tokens_per_s, 1), "requests_per_s": round(self.requests_per_s, 2),
                "ttft_p50_ms": _ms(self.ttft_s, 0.5), "ttft_p99_ms": _ms(self.ttft_s, 0.99),
                "tpot_p50_ms": _ms(self.tpot_s, 0.5, 2), "tpot_p99_ms": _ms(self.tpot_s, 0.99, 2),
                "itl_p50_ms": _ms(self.itl_s, 0.5, 2), "itl_p99_ms": _ms(self.itl_s, 0.99, 2),
                "e2e_p50_ms": _ms(self.e2e_s, 0.5), "e2e_p99_ms": _ms(self.e2e_s, 0.99)}


class _Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.ttft, self.tpot, self.itl, self.e2e, self.tokens, self.errors = [], [], [], [], 0, 0

    def add(self, start: float, times: list[float], ok: bool, end: float | None = None) -> None:
        with self.lock:
            if not ok:
                self.errors += 1
            self.tokens += len(times)
            if times:
                self.ttft.append(times[0] - start)
                self.itl.extend(b - a for a, b in zip(times, times[1:]))
                if len(times) > 1:
                    self.tpot.append((times[-1] - times[0]) / (len(times) - 1))
                if ok:
                    self.e2e.append((end or times[-1]) - start)

    def result(self, path: str, spec: LoadSpec, wall_s: float) -> LoadResult:
        return LoadResult(path, spec, wall_s, self.tokens, self.errors, self.ttft, self.tpot, self.itl, self.e2e)


def _run_threads(path: str, spec: LoadSpec, one) -> LoadResult:
    """`one(prompt, output_len)` yields the number of tokens in each chunk it receives."""
    planned = spec.plan()
    tally = _Tally()

    def send(item: Planned, start: float) -> None:
        times, ok = [], True
        try:
            for n in one(item.prompt, item.output_len):
                now = time.perf_counter()
                times.extend([now] * n)
        except Exception:  # noqa: BLE001 - counted; the bench goes on
            ok = False
        tally.add(start, times, ok, time.perf_counter())

    started = time.perf_counter()
    if spec.rate is None:
        next_index = iter(range(len(planned)))
        lock = threading.Lock()

        def worker():
            while True:
                with lock:
                    k = next(next_index, None)
                if k is None:
                    return
                send(planned[k], time.perf_counter())

        with concurrent.futures.ThreadPoolExecutor(spec.concurrency) as pool:
            for future in [pool.submit(worker) for _ in range(spec.concurrency)]:
                future.result()
    else:  # open loop: one thread per request in flight, each started at its arrival (latency counts from it)
        with concurrent.futures.ThreadPoolExecutor(min(len(planned), MAX_OPEN_LOOP_THREADS)) as pool:
            futures = []
            for item in planned:
                time.sleep(max(0.0, started + item.at - time.perf_counter()))
                futures.append(pool.submit(send, item, started + item.at))
            for future in futures:
                future.result()
    return tally.result(path, spec, time.perf_counter() - started)


def run_http(base_url: str, spec: LoadSpec) -> LoadResult:
    import json

    import requests

    local = threading.local()

    def one(prompt, output_len):
        session = getattr(local, "session", None) or requests.Session()
        local.session = session
        body = {"prompt": prompt, "max_tokens": output_len, "stream": True, "ignore_eos": True,
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

    def one(prompt, output_len):
        request = pb.GenerateRequest(tokens=pb.TokenIds(ids=prompt), max_tokens=output_len, ignore_eos=True)
        for chunk in stub.GenerateStream(request, timeout=600):
            if chunk.token_ids:
                yield len(chunk.token_ids)

    try:
        return _run_threads("grpc", spec, one)
    finally:
        channel.close()


def run_router(router, spec: LoadSpec) -> LoadResult:
    """The same load straight on a router actor (asyncio in this process), through one subscription as an
    ingress replica sends it (cluster/channel.py): the baseline for the ingress."""
    from cluster.channel import RouterChannel
    from grok1.engine_api import Request, Sampling

    planned = spec.plan()
    tally = _Tally()
    channels: list[RouterChannel] = []

    async def send(k: int, item: Planned, start: float) -> None:
        times, ok = [], True
        try:
            stream = await channels[0].submit(
                # No logprobs, as the HTTP and gRPC paths' requests (which do not ask for them)
                Request(f"bench-{k}-{time.monotonic_ns()}", item.prompt, item.output_len,
                        sampling=Sampling(logprobs=False), ignore_eos=True))
            finished = False
            while not finished:
                for event in await stream.next_batch():  # a list: the events since the last read
                    if event.token is not None:
                        times.append(time.perf_counter())
                    if event.finish_reason and event.finish_reason not in ("stop", "length"):
                        ok = False
                    finished = finished or event.finish_reason is not None
        except Exception:  # noqa: BLE001
            ok = False
        tally.add(start, times, ok, time.perf_counter())

    async def main(started: float):
        channels.append(RouterChannel(router))
        try:
            await _send_all(started)
        finally:
            channels[0].close()

    async def _send_all(started: float):
        if spec.rate is not None:
            tasks = []
            for k, item in enumerate(planned):
                await asyncio.sleep(max(0.0, started + item.at - time.perf_counter()))
                tasks.append(asyncio.ensure_future(send(k, item, started + item.at)))
            await asyncio.gather(*tasks)
            return
        queue = list(enumerate(planned))

        async def worker():
            while queue:
                k, item = queue.pop()
                await send(k, item, time.perf_counter())

        await asyncio.gather(*(worker() for _ in range(spec.concurrency)))

    started = time.perf_counter()
    asyncio.run(main(started))
    return tally.result("router", spec, time.perf_counter() - started)


def format_table(results: list[LoadResult], baseline: LoadResult | None = None) -> str:
    head = (f"{'path':<7} {'load':>9} {'reqs':>5} {'tok/s':>8} {'req/s':>6} {'ratio':>6} {'TTFT p50/p99 ms':>17} "
            f"{'ITL p50/p99 ms':>17} {'E2E p50/p99 ms':>17} {'errors':>6}")
    lines = [head]
    for r in results:
        s = r.summary()
        ratio = f"{r.tokens_per_s / baseline.tokens_per_s:.0%}" if baseline and baseline.tokens_per_s else "-"
        load = f"{r.spec.rate:g}/s" if r.spec.rate is not None else f"{r.spec.concurrency} str"
        lines.append(f"{r.path:<7} {load:>9} {r.spec.requests:>5} {r.tokens_per_s:>8.1f} {r.requests_per_s:>6.2f} "
                     f"{ratio:>6} {s['ttft_p50_ms']!s:>8}/{s['ttft_p99_ms']!s:<8} "
                     f"{s['itl_p50_ms']!s:>8}/{s['itl_p99_ms']!s:<8} {s['e2e_p50_ms']!s:>8}/{s['e2e_p99_ms']!s:<8} "
                     f"{r.errors:>6}")
    return "\n".join(lines)
