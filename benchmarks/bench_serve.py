"""End-to-end serving throughput: the same load over HTTP, over gRPC, and straight on the router, in one run.

    python -m benchmarks.bench_serve [--config configs/grok-1-tiny.yaml] [--ep 2] [--backend ray] [--direct-ingress]
                                     [--concurrency 32] [--requests 64] [--prompt-len 16] [--output-len 32]

Starts a local Ray instance and the Serve application (random-weight checkpoint written on first use), waits
for the weights, warms every path up, then runs the load (ingress/loadgen.py: `concurrency` streams, random
prompts of exactly prompt_len tokens, exactly output_len tokens each, ignore_eos) on the router directly, over
HTTP and over gRPC, and prints tokens/s, TTFT and TPOT with each ingress path's ratio to the router's
(target: >= 85%). The client runs on the same machine as the server: on a small machine it takes CPU from it.

Then latency vs request rate, open loop (Poisson arrivals, lengths uniform in [L/2, 3L/2]): our generator over
gRPC at each of `--rates`, and an established load generator over HTTP at the same rates when it is installed
(benchmarks/external_load.py: guidellm; `make bench` installs it). Tables in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/grok-1-tiny.yaml")
    parser.add_argument("--checkpoint")
    parser.add_argument("--ep", type=int, default=2)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--backend", default="ray", choices=["ray", "local"])
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rates", type=float, nargs="*", default=[1.0, 2.0, 4.0],
                        help="open-loop request rates (requests/s) for the latency-vs-rate tables; none: skip")
    parser.add_argument("--rate-requests", type=int, default=32, help="requests per open-loop rate")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="the serving config's stream_interval: tokens per HTTP / gRPC chunk after the first")
    parser.add_argument("--direct-ingress", action="store_true",
                        help="the replica serves HTTP and gRPC itself, no Serve proxy (ingress/direct_ingress.py)")
    parser.add_argument("--cpu-bind", default=None,
                        help="cpu_bind for the CPU shard workers (auto, all, 0-3|4-7); default: the config's")
    parser.add_argument("--num-cpus", type=int, default=None, help="logical CPUs of the local Ray instance")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    from ray import serve

    from benchmarks import external_load
    from grok1.config import load_config
    from ingress.launch import free_port, start_serving
    from ingress.loadgen import LoadSpec, format_table, run_grpc, run_http, run_router

    config = load_config(args.config)
    app_args = {"config": args.config, "ep": args.ep, "tp": args.tp, "backend": args.backend,
                "random_if_missing": True, "max_queue": max(256, args.requests),
                "stream_interval": args.stream_interval}
    if args.checkpoint:
        app_args["checkpoint"] = args.checkpoint
    if args.cpu_bind:
        app_args["cpu_bind"] = args.cpu_bind
    http_port, grpc_port = free_port(), free_port()
    router = start_serving(app_args, http_port=http_port, grpc_port=grpc_port,
                           num_cpus=args.num_cpus or max(4, 2 * args.ep), direct_ingress=args.direct_ingress)
    http, grpc_target = f"http://127.0.0.1:{http_port}", f"127.0.0.1:{grpc_port}"
    spec = LoadSpec(args.concurrency, args.requests, args.prompt_len, args.output_len, config.model.vocab_size)
    try:
        warm = LoadSpec(min(4, args.concurrency), min(4, args.requests), args.prompt_len, 4,
                        config.model.vocab_size, seed=1)
        run_router(router, warm), run_http(http, warm), run_grpc(grpc_target, warm)
        baseline = run_router(router, spec)
        results = [baseline, run_http(http, spec), run_grpc(grpc_target, spec)]
        open_loop = [run_grpc(grpc_target, LoadSpec(args.concurrency, args.rate_requests, args.prompt_len,
                                                    args.output_len, config.model.vocab_size, seed=2, rate=rate,
                                                    spread=0.5)) for rate in args.rates]
        external = external_load.run(http, config.name, args.rates, args.rate_requests, args.prompt_len,
                                     args.output_len) if args.rates else None
    finally:
        serve.shutdown()
    cpu = platform.processor() or platform.machine()
    print(f"\n{config.name}, ep={args.ep} tp={args.tp}, backend {args.backend}, "
          f"stream_interval {args.stream_interval}, "
          f"{'direct ingress' if args.direct_ingress else 'through the proxy'}, {cpu}"
          f": {args.concurrency} streams, {args.requests} requests, prompt {args.prompt_len}, output {args.output_len}")
    print(format_table(results, baseline))
    if open_loop:
        print(f"\nlatency vs rate, open loop (Poisson), grpc, our generator: {args.rate_requests} requests per rate, "
              f"prompt {args.prompt_len} and output {args.output_len} tokens +-50%")
        print(format_table(open_loop))
    if external is not None:
        print(f"\nlatency vs rate, open loop (Poisson), http, {external.tool}:")
        print(external.table)
    summary = [*({**r.summary(), "open_loop": True} for r in open_loop)]
    summary += [{**r.summary(), "ratio_to_router": round(r.tokens_per_s / baseline.tokens_per_s, 3)
                if baseline.tokens_per_s else None} for r in results]
    if args.json:
        with open(args.json, "w") as file:
            json.dump(summary, file, indent=1)
    return 1 if any(r.errors for r in [*results, *open_loop]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
