"""`make bench`: the Ray cluster (router + 2-worker expert-parallel group on two nodes) vs the single-process engine.

    python -m benchmarks.bench_cluster [--config configs/grok-1-tiny.yaml] [--tokens 48] [--rounds 3]

One run, on this machine, measures side by side:
1. the single-process engine (grok1.engine.Engine, no mesh) in this process, driven by cluster.driver.Driver,
   pipelined and not;
2. the router actor (cluster.router.start_router, ep=2, STRICT_SPREAD), pipelined and not (two routers, each
   with its own group), streaming TokenEvents to this process; the pipelined one is the router of the Serve
   application (ingress/app.py, on the same cluster), so the same router is also measured over HTTP
   (streaming completions through Serve's proxy, ingress/loadgen.py's client) and read through one subscription
   (cluster.channel.RouterChannel, the ingress's own way: one Ray item per step for all its requests);
3. a third 2-worker ep=2 group (workers.group.RayShardGroup, STRICT_SPREAD) driven by the same Driver from this
   process, without the router actor or streaming; on it, the step breakdown: the decode step's wall time,
   the time each worker spends inside it (ShardWorker.timings), the round trip of a no-op call (`ping`);
4. ep=2 on 2 virtual devices in one process (benchmarks/multiprocess_worker.py): the same program without
   processes, Ray or gloo.
All of them stay up, and every measurement runs once per round, interleaved, `rounds` times; the tables
give medians. On a shared machine a slow spell then hits every column rather than one.

The cluster is `ray.cluster_utils.Cluster`: a head with no CPUs (the routers need none) and two worker nodes
(separate raylets on this host) of 3 CPUs each (one per group), so each group's two shards land on different
nodes; the script checks that. Load: n streams, each one request of a random 16-token prompt and exactly
`tokens` tokens (ignore_eos); tokens/s = all tokens / the wall time from submitting to the last token.

Breakdown of a decode step at 32 active slots: Ray dispatch = the step's wall time seen by the caller minus
the time inside the worker's decode call; inside the worker, collective + process split = the worker's time
minus the same ep=2 step on virtual devices in one process (the compute). Router overhead = the router's
time per step of the n-stream load (n / its tok/s: one step makes one token per stream, prefills included)
minus the directly driven group's, at 1 and 32 streams, next to the engine / router / HTTP ratios. Prints
Markdown tables; docs/benchmarks.md records them. Not a test: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from benchmarks.router_overhead import stream_tokens

ROOT = Path(__file__).resolve().parents[1]
CONCURRENCY = [1, 8, 32]
_ids = itertools.count()


def _requests(streams: int, tokens: int, prompt_len: int, seed: int):
    from cluster.scheduler import Request

    rng = np.random.default_rng(seed)
    return [Request(f"bench-{next(_ids)}", [int(t) for t in rng.integers(3, 1000, prompt_len)], tokens,
                    ignore_eos=True) for _ in range(streams)]


def driver_tokens_per_s(engine, config, streams: int, tokens: int, prompt_len: int, pipelined: bool) -> float:
    """All streams submitted at once to a Driver over `engine` (Engine or GroupEngine), run to the end."""
    from cluster.driver import Driver
    from cluster.scheduler import Scheduler

    scheduler = Scheduler(config.engine.max_slots, config.engine.max_len, config.model.vocab_size,
                          config.model.eos_token)
    requests = _requests(streams, tokens, prompt_len, seed=streams)
    started = time.perf_counter()
    done = Driver(engine, scheduler, pipelined=pipelined).generate(requests)
    elapsed = time.perf_counter() - started
    assert all(len(c.tokens) == tokens for c in done)
    return streams * tokens / elapsed


def decode_step_s(engine, steps: int, prompt_len: int, pipelined: bool) -> tuple[float, float]:
    """Seconds per prefill (filling every slot, `engine.max_slots`) and per decode step with every slot active,
    tokens read back each step (pipelined: step k+1 is started before step k's tokens are read, as the Driver
    does)."""
    from grok1.engine import Sampling

    rng = np.random.default_rng(0)
    started = time.perf_counter()
    for slot in range(engine.max_slots):
        engine.prefill(slot, [int(t) for t in rng.integers(3, 1000, prompt_len)], Sampling())
    prefill = (time.perf_counter() - started) / engine.max_slots
    engine.decode()
    started = time.perf_counter()
    if pipelined:
        handle = engine.decode_start()
        for _ in range(steps - 1):
            following = engine.decode_start()
            engine.decode_finish(handle)
            handle = following
        engine.decode_finish(handle)
    else:
        for _ in range(steps):
            engine.decode()
    seconds = (time.perf_counter() - started) / steps
    for slot in range(engine.max_slots):
        engine.release(slot)
    return prefill, seconds


def router_tokens_per_s(router, streams: int, tokens: int, prompt_len: int) -> float:
    requests = _requests(streams, tokens, prompt_len, seed=streams)

    async def run():
        return await asyncio.gather(*[stream_tokens(router, r) for r in requests])

    started = time.perf_counter()
    counts = asyncio.run(run())
    elapsed = time.perf_counter() - started
    assert counts == [tokens] * streams, counts
    return streams * tokens / elapsed


def subscribed_tokens_per_s(router, streams: int, tokens: int, prompt_len: int) -> float:
    """The same load read through one subscription (cluster.channel.RouterChannel, as the Serve ingress reads its
    router): one Ray streaming item per step for all the requests, where `generate` makes one per request."""
    from cluster.channel import RouterChannel

    requests = _requests(streams, tokens, prompt_len, seed=streams)

    async def one(channel, request) -> int:
        stream, count = await channel.submit(request), 0
        while True:
            batch = await stream.next_batch()
            for event in batch:
                if event.error:
                    raise RuntimeError(f"{request.request_id}: {event.error}")
                count += event.token is not None
            if batch[-1].finish_reason is not None:
                return count

    async def run():
        channel = RouterChannel(router)
        try:
            return await asyncio.gather(*[one(channel, r) for r in requests])
        finally:
            channel.close()

    started = time.perf_counter()
    counts = asyncio.run(run())
    elapsed = time.perf_counter() - started
    assert counts == [tokens] * streams, counts
    return streams * tokens / elapsed


def start_serve_on_cluster(config, checkpoint: str):
    """The Serve application (HTTP) with its own router and ep=2 group, STRICT_SPREAD; returns (router, url)."""
    import tempfile

    import ray
    import yaml
    from ray import serve

    from ingress.app import build_app, serve_options
    from ingress.launch import free_port

    source = yaml.safe_load((ROOT / "configs" / f"{config.name}.yaml").read_text())
    source["engine"]["max_slots"] = config.engine.max_slots  # the Serve app reads its config from a file
    path = Path(tempfile.mkdtemp(prefix="bench-cluster-")) / "config.yaml"
    path.write_text(yaml.safe_dump(source))
    http_port = free_port()
    # One proxy, on the head: the nodes of this cluster share one host, and so its ports.
    serve.start(proxy_location="HeadOnly", **serve_options("127.0.0.1", http_port, free_port()))
    app = build_app({"config": str(path), "checkpoint": checkpoint, "ep": 2, "placement_strategy": "STRICT_SPREAD",
                     "backend": "ray"})
    router = serve.run(app, name="bench", route_prefix="/", blocking=False).router_handle.remote().result()
    assert ray.get(router.wait_ready.remote(600))
    return router, f"http://127.0.0.1:{http_port}"


def http_tokens_per_s(url: str, config, streams: int, tokens: int, prompt_len: int) -> float:
    """n streaming completions at once over HTTP, one request each, exactly `tokens` tokens."""
    from ingress.loadgen import LoadSpec, run_http

    result = run_http(url, LoadSpec(streams, streams, prompt_len, tokens, config.model.vocab_size, seed=streams))
    assert result.errors == 0 and result.output_tokens == streams * tokens, result.summary()
    return result.tokens_per_s


def start_router_on_cluster(config, checkpoint: str, pipelined: bool):
    """The router actor; its group loads in the background (`ready_router` waits for it)."""
    from cluster.router import start_router

    return start_router(config, checkpoint=checkpoint, ep=2, placement_strategy="STRICT_SPREAD", backend="ray",
                        pipelined=pipelined, start_timeout_s=600, step_timeout_s=120)


def ready_router(router) -> None:
    import ray

    assert ray.get(router.wait_ready.remote(600))
    node_ids = ray.get(router.stats.remote())["node_ids"]
    assert len(node_ids) == 2 and len(set(node_ids)) == 2, f"the two shard workers share a node: {node_ids}"
    router_tokens_per_s(router, 32, 4, 16)  # warm the streaming path (the steps were compiled at start)


def group_breakdown(group, group_engine, steps: int, prompt_len: int) -> dict:
    """One round of the step breakdown on a RayShardGroup (seconds)."""
    pings = []
    for _ in range(30):
        started = time.perf_counter()
        group.call("ping")
        pings.append(time.perf_counter() - started)
    out = {"ping": statistics.median(pings)}
    for pipelined in (False, True):
        group.call("timings", True)
        out["prefill", pipelined], out["step", pipelined] = decode_step_s(group_engine, steps, prompt_len,
                                                                           pipelined=pipelined)
        timings = group.call("timings", True)
        # The worker whose call arrived last waited least for its peer inside the collective.
        out["inside", pipelined] = min(t["decode"][1] / t["decode"][0] for t in timings)
        out["inside prefill", pipelined] = min(t["prefill"][1] / t["prefill"][0] for t in timings)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/grok-1-tiny.yaml")
    parser.add_argument("--checkpoint", help="default: the config's, a random one written on first use")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per stream")
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30, help="decode steps timed for the breakdown")
    parser.add_argument("--rounds", type=int, default=3, help="every measurement, interleaved; medians reported")
    args = parser.parse_args(argv)

    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    from benchmarks.bench_multiprocess import Layout, measure
    from cluster.replica_config import ReplicaConfig
    from grok1.config import load_config
    from grok1.engine import Engine
    from grok1.loading import ensure_random_checkpoint, load_params
    from ingress.edge import apply_proxy_env
    from workers.group import GroupEngine, RayShardGroup

    config = load_config(args.config).replace(engine={"max_slots": 32})
    checkpoint = args.checkpoint or str(ensure_random_checkpoint(config, Path(config.checkpoint.path)))
    workload = dict(tokens=args.tokens, prompt_len=args.prompt_len)

    # Three groups of 2 workers live at once (two routers and the one driven from here): 3 CPUs per node.
    apply_proxy_env()  # before Ray starts: the Serve proxy inherits it
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    for _ in range(2):
        cluster.add_node(num_cpus=3)
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}}, include_dashboard=False,
             log_to_driver=False)
    cluster.wait_for_nodes()
    samples = {}  # (what, streams, pipelined) -> [tokens/s per round]; ("breakdown",) -> [dict per round]

    def record(key, value):
        samples.setdefault(key, []).append(value)

    routers, group, url = {}, None, None
    try:
        routers = {False: start_router_on_cluster(config, checkpoint, pipelined=False)}
        routers[True], url = start_serve_on_cluster(config, checkpoint)
        spec = ReplicaConfig(ep=2, placement_strategy="STRICT_SPREAD", start_timeout_s=600,
                             step_timeout_s=120).group_spec(config, checkpoint)
        group = RayShardGroup(spec)
        nodes = [member["node_id"] for member in group.members()]
        assert len(set(nodes)) == 2, f"the two shard workers share a node: {nodes}"
        group_engine = GroupEngine(group)
        group_engine.max_slots = config.engine.max_slots
        for router in routers.values():
            ready_router(router)
        http_tokens_per_s(url, config, 4, 4, args.prompt_len)  # warm the HTTP path
        engine = Engine(config, load_params(config, Path(checkpoint)))
        engine.warmup()
        driver_tokens_per_s(group_engine, config, 32, pipelined=True, tokens=4, prompt_len=args.prompt_len)

        # Every measurement once per round, side by side, so that a slow spell of the shared machine shows up
        # in all of them rather than in one column.
        for round_index in range(args.rounds):
            for n in CONCURRENCY:
                record(("engine", n, True), driver_tokens_per_s(engine, config, n, pipelined=True, **workload))
                record(("router", n, True), router_tokens_per_s(routers[True], n, **workload))
                record(("subscribed", n, True), subscribed_tokens_per_s(routers[True], n, **workload))
                record(("http", n, True), http_tokens_per_s(url, config, n, **workload))
                record(("group", n, True), driver_tokens_per_s(group_engine, config, n, pipelined=True, **workload))
            record(("engine", 32, False), driver_tokens_per_s(engine, config, 32, pipelined=False, **workload))
            record(("router", 32, False), router_tokens_per_s(routers[False], 32, **workload))
            record(("group", 32, False), driver_tokens_per_s(group_engine, config, 32, pipelined=False, **workload))
            for pipelined in (False, True):
                prefill, step = decode_step_s(engine, args.steps, args.prompt_len, pipelined=pipelined)
                record(("engine step", pipelined), step)
                record(("engine prefill", pipelined), prefill)
            record(("breakdown",), group_breakdown(group, group_engine, args.steps, args.prompt_len))
            print(f"round {round_index + 1}: " + ", ".join(
                f"{what} {n}{'' if p else ' not pipelined'} {values[-1]:.0f} tok/s"
                for (what, *rest), values in samples.items() if len(rest) == 2
                for n, p in [rest]), flush=True)
        engine.shutdown()
    finally:
        if group is not None:
            group.shutdown()
        if url is not None:
            serve.shutdown()  # the app's router and its workers go with it
        for pipelined, router in routers.items():
            if not pipelined:
                ray.kill(router)  # its shard workers and placement group go with it
        ray.shutdown()
        cluster.shutdown()

    # The same ep=2 program on 2 virtual devices in one process: the compute without processes, Ray or gloo.
    virtual_step = measure(args.config, checkpoint, Layout("ep=2, 1 process x 2 virtual devices", 2, 1, 2),
                           steps=args.steps, repeats=args.rounds, prompt_len=args.prompt_len)["step_s"]

    median = lambda key: statistics.median(samples[key])  # noqa: E731
    print(f"\n{config.name}: router + 2-worker ep=2 group on two Ray nodes vs the single-process engine, "
          f"{platform.machine()} CPU, {os.cpu_count()} cores; each stream 1 request, prompt {args.prompt_len}, "
          f"{args.tokens} tokens; medians of {args.rounds} interleaved rounds\n")
    print("| streams | pipelined | engine tok/s | cluster (router) tok/s | cluster / engine | "
          "group driven from here tok/s | group / engine |")
    print("|---|---|---|---|---|---|---|")
    for n, pipelined in [(n, True) for n in CONCURRENCY] + [(32, False)]:
        engine_tps, router_tps, group_tps = (median((what, n, pipelined)) for what in ("engine", "router", "group"))
        print(f"| {n} | {'yes' if pipelined else 'no'} | {engine_tps:.1f} | {router_tps:.1f} | "
              f"{router_tps / engine_tps:.0%} | {group_tps:.1f} | {group_tps / engine_tps:.0%} |")

    rounds = samples[("breakdown",)]
    part = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    ms = lambda seconds: f"{1000 * seconds:.1f}"  # noqa: E731
    print(f"\ndecode step with 32 active slots, ms (median over rounds of {args.steps} steps each)\n")
    print("| | not pipelined | pipelined |")
    print("|---|---|---|")
    print(f"| single-process engine | {ms(median(('engine step', False)))} | {ms(median(('engine step', True)))} |")
    print(f"| ep=2 on 2 virtual devices in one process (compute) | {ms(virtual_step)} | |")
    print(f"| 2-worker group, seen from the caller | {ms(part(('step', False)))} | {ms(part(('step', True)))} |")
    print(f"| inside the worker's decode call (compute + collective) | {ms(part(('inside', False)))} | "
          f"{ms(part(('inside', True)))} |")
    print(f"| collective + process split (inside worker - virtual devices) | "
          f"{ms(part(('inside', False)) - virtual_step)} | {ms(part(('inside', True)) - virtual_step)} |")
    print(f"| Ray dispatch (caller - inside worker) | "
          f"{ms(statistics.median(r['step', False] - r['inside', False] for r in rounds))} | "
          f"{ms(statistics.median(r['step', True] - r['inside', True] for r in rounds))} |")
    print(f"| Ray round trip of a no-op call to both workers (ping) | {ms(part('ping'))} | |")
    print(f"| one prefill ({args.prompt_len} tokens): single-process engine / group from the caller / inside "
          f"the worker | {ms(median(('engine prefill', False)))} / {ms(part(('prefill', False)))} / "
          f"{ms(part(('inside prefill', False)))} | |")
    for pipelined in (False, True):  # per step of the 32-stream load, prefills included
        router_step, group_step = (32 / median((what, 32, pipelined)) for what in ("router", "group"))
        print(f"| 32 streams, per step: router / group driven from here "
              f"({'pipelined' if pipelined else 'not pipelined'}) | {ms(router_step)} / {ms(group_step)} | |")
    print_router_overhead(median)


def print_router_overhead(median) -> None:
    """Engine, router and HTTP side by side at 1 and 32 streams, and the router's own time per step."""
    print("\nthe router's overhead (pipelined; ms per step = streams / tok/s: one token per stream per step)\n")
    print("| streams | engine tok/s | router tok/s | HTTP tok/s | router / engine | HTTP / router | HTTP / engine | "
          "ms per step: engine / group / router / HTTP | router overhead per step (router - group) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in (1, 32):
        engine, router, http, group = (median((what, n, True)) for what in ("engine", "router", "http", "group"))
        steps = [1000 * n / tps for tps in (engine, group, router, http)]
        print(f"| {n} | {engine:.1f} | {router:.1f} | {http:.1f} | {router / engine:.0%} | {http / router:.0%} | "
              f"{http / engine:.0%} | {' / '.join(f'{s:.1f}' for s in steps)} | "
              f"{steps[2] - steps[1]:.1f} ms ({steps[2] / steps[1] - 1:+.0%}) |")
    print("\nthe same router read through one subscription (cluster.channel.RouterChannel, as the Serve ingress reads "
          "it: one Ray item per step for every request) and through a stream per request (`generate`)\n")
    print("| streams | engine tok/s | router, a stream per request | router, one subscription | "
          "subscription / engine |")
    print("|---|---|---|---|---|")
    for n in CONCURRENCY:
        engine, router, subscribed = (median((what, n, True)) for what in ("engine", "router", "subscribed"))
        print(f"| {n} | {engine:.1f} | {router:.1f} | {subscribed:.1f} | {subscribed / engine:.0%} |")

if __name__ == "__main__":
    main()
