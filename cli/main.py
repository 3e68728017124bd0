"""The `grok1` command line.

    grok1 generate "prompt" [--config C] [--checkpoint DIR] [--max-tokens N] [--temperature T] ...
    grok1 checkpoint random --config C [--out DIR] [--seed S]
    grok1 checkpoint inspect DIR --config C
    grok1 checkpoint convert SRC DST --config C
    grok1 config show C
    grok1 plan --config C --hosts H --devices-per-host D --device-memory 80GiB [--slots S --max-len L] ...
    grok1 serve --config C [--checkpoint DIR] [--ep N] [--tp N] [--http-port 8000] [--grpc-port 9000]
                [--direct-ingress] ...
    grok1 generate "prompt" --http URL | --grpc HOST:PORT [--stream]     (a running server instead)
    grok1 bench --http URL | --grpc HOST:PORT [--concurrency 32] [--requests 64] [--prompt-len L] [--output-len L]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

from cli import flags
from grok1.config import ConfigError, Grok1Config, load_config
from grok1.loading import ensure_random_checkpoint, load_params
from ingress.serving_config import DEFAULT_CONFIG, ServingConfig

SERVE_FLAGS = {"num_replicas": "--replicas"}  # flags not spelled as their field


def _config(args) -> Grok1Config:
    config = load_config(args.config)
    if getattr(args, "checkpoint", None):
        config = config.replace(checkpoint={"path": args.checkpoint})
    return config


def _checkpoint_dir(config: Grok1Config, config_path: str) -> Path:
    if not config.checkpoint.path:
        raise ConfigError(f"{config_path}: checkpoint.path is not set; pass --checkpoint DIR")
    return Path(config.checkpoint.path)


def cmd_generate(args) -> int:
    from cluster.driver import Driver
    from cluster.scheduler import Request, Scheduler
    from grok1.compile_cache import enable_compile_cache
    from grok1.engine import Sampling
    from grok1.paged_engine import make_engine
    from grok1.tokenizer import Tokenizer

    if args.http or args.grpc:
        return cmd_generate_remote(args)
    config = _config(args)
    directory = _checkpoint_dir(config, args.config)
    if args.random_if_missing:
        ensure_random_checkpoint(config, directory)
    tokenizer = Tokenizer.load(args.tokenizer or config.tokenizer, directory)
    started = time.perf_counter()
    enable_compile_cache()
    engine = make_engine(config, load_params(config, directory))
    scheduler = Scheduler.for_config(config)
    streamed: list[int] = []

    def show(event):
        if args.stream and event.token is not None:
            streamed.append(event.token)
            print(tokenizer.decode(streamed[-1:]), end="", flush=True)

    driver = Driver(engine, scheduler, on_event=show)
    loaded = time.perf_counter()
    request = Request("cli", tokenizer.encode(args.prompt), max_tokens=args.max_tokens,
                      sampling=Sampling(args.temperature, args.top_p, args.top_k, args.seed))
    completion = driver.generate([request])[0]
    done = time.perf_counter()
    text = tokenizer.decode(completion.tokens)
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": text, "tokens": completion.tokens,
                          "finish_reason": completion.finish_reason}))
    elif args.stream:
        print()
    else:
        print(args.prompt + text)
    print(f"[{config.name}: {len(completion.tokens)} tokens in {done - loaded:.2f}s "
          f"(load + compile {loaded - started:.1f}s), finish: {completion.finish_reason}]", file=sys.stderr)
    return 0


def cmd_checkpoint_random(args) -> int:
    from grok1.checkpoint import write_random_checkpoint

    config = load_config(args.config)
    out = Path(args.out or config.checkpoint.path or f"checkpoints/{config.name}")
    path = write_random_checkpoint(out, config.model, seed=args.seed, record_module=args.record_module)
    print(path)
    return 0


def cmd_checkpoint_inspect(args) -> int:
    from grok1.checkpoint import load_checkpoint
    from grok1.params import param_bytes

    config = load_config(args.config)
    params = load_checkpoint(args.directory, config.model, progress=sys.stderr.isatty())
    print(json.dumps({"config": config.name, "parameters": config.model.param_count(),
                      "bytes_in_memory": param_bytes(params)}, indent=1))
    return 0


def cmd_checkpoint_convert(args) -> int:
    from grok1.sliceable import sliceable_bytes
    from grok1.sliceable_convert import convert

    config = load_config(args.config)
    started = time.perf_counter()
    path = convert(args.src, args.dst, config.model, progress=sys.stderr.isatty())
    print(path)
    print(f"wrote {sliceable_bytes(path)} bytes in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


def cmd_config_show(args) -> int:
    config = load_config(args.config)
    print(json.dumps({**dataclasses.asdict(config), "derived": {
        "ffn_size": config.model.ffn_size, "parameters": config.model.param_count()}}, indent=1))
    return 0


def cmd_plan(args) -> int:
    """Print the sharding plan; exit 1 when the layout exists but does not fit (the reason on stderr)."""
    from planning.memory_size import parse_memory_size
    from planning.plan import plan

    result = plan(load_config(args.config), args.hosts, args.devices_per_host,
                  parse_memory_size(args.device_memory, "--device-memory"), slots=args.slots,
                  max_len=args.max_len, ep=args.ep, tp=args.tp, memory_fraction=args.memory_fraction,
                  mean_len=args.mean_len)
    print(json.dumps(result.to_dict(), indent=1) if args.json else result.format())
    if not result.feasible:
        print(f"grok1: infeasible: {result.problem}", file=sys.stderr)
        return 1
    return 0


# ---------------------------------------------------------------------------- serving (ingress/)


def cmd_generate_remote(args) -> int:
    """`grok1 generate --http URL | --grpc HOST:PORT`: the same generation, from a running server."""
    from ingress.client import ClientError, GenerationParams, GrpcClient, HttpClient

    api_key = os.environ.get("GROK1_API_KEY")
    client = GrpcClient(args.grpc, api_key=api_key) if args.grpc else HttpClient(args.http, api_key=api_key)
    sampling = GenerationParams(args.max_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    try:
        if args.stream:
            for chunk in client.stream(args.prompt, sampling):
                print(chunk.text, end="", flush=True)
            print()
            return 0
        result = client.generate(args.prompt, sampling)
    except ClientError as err:
        print(f"grok1: error: {err}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.json:
        print(json.dumps({"prompt": args.prompt, "text": result.text, "tokens": result.token_ids,
                          "finish_reason": result.finish_reason}))
    else:
        print(args.prompt + result.text)
    return 0


def cmd_serve(args) -> int:
    from ingress.launch import serve_forever

    serving = ServingConfig.from_overrides(flags.overrides(args, ServingConfig))
    if args.direct_ingress:
        from ingress.direct_ingress import DirectIngress

        try:
            DirectIngress(args.http_port, args.grpc_port, serving.num_replicas)
        except ValueError as err:
            print(f"grok1: error: --direct-ingress: {err}", file=sys.stderr)
            return 2
    return serve_forever(serving, http_host=args.host, http_port=args.http_port, grpc_port=args.grpc_port,
                         model=load_config(serving.config).name, direct_ingress=args.direct_ingress)


def cmd_bench(args) -> int:
    from ingress.loadgen import LoadSpec, format_table, run_grpc, run_http

    results = []
    for rate in args.rate or [None]:  # one run per rate (open loop), or one closed-loop run
        spec = LoadSpec(args.concurrency, args.requests, args.prompt_len, args.output_len, seed=args.seed,
                        rate=rate, spread=args.spread)
        results.append(run_grpc(args.grpc, spec) if args.grpc else run_http(args.http, spec))
    print(json.dumps([r.summary() for r in results] if args.rate else results[0].summary()) if args.json
          else format_table(results))
    return 1 if any(r.errors for r in results) else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grok1", description="Grok-1 serving tools")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text in this process")
    gen.add_argument("prompt")
    gen.add_argument("--config", default=DEFAULT_CONFIG)
    gen.add_argument("--checkpoint", help="checkpoint directory (overrides the config)")
    gen.add_argument("--tokenizer", help="path to tokenizer.model")
    gen.add_argument("--random-if-missing", action="store_true",
                     help="write a random-weight checkpoint first if the directory has none")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    gen.add_argument("--json", action="store_true")
    gen.add_argument("--http", metavar="URL", help="ask a running server over HTTP (e.g. http://127.0.0.1:8000)")
    gen.add_argument("--grpc", metavar="HOST:PORT", help="ask a running server over gRPC (e.g. 127.0.0.1:9000); "
                                                         "with --http or --grpc, $GROK1_API_KEY is sent as the key")
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="serve HTTP (OpenAI-compatible) and gRPC with Ray Serve",
                         description="Every setting but the three addresses is a field of the serving config "
                                     "(ingress/serving_config.py); a flag overrides its default.")
    srv.add_argument("--host", default="127.0.0.1", help="HTTP bind address (0.0.0.0 for all)")
    srv.add_argument("--http-port", type=int, default=8000)
    srv.add_argument("--grpc-port", type=int, default=9000)
    srv.add_argument("--direct-ingress", action="store_true",
                     help="the replica serves --http-port and --grpc-port itself, with no Serve proxy in between "
                          "(Ray's direct ingress, experimental: ingress/direct_ingress.py); with --replicas N "
                          "the replicas of a node take N consecutive ports")
    flags.add_model_flags(srv, ServingConfig, SERVE_FLAGS)
    srv.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="load generator against a running server: TTFT, ITL, E2E, tokens/s",
                           description="Closed loop (--concurrency streams) or, with --rate, open loop: Poisson "
                                       "arrivals at each rate in turn (ingress/loadgen.py).")
    target = bench.add_mutually_exclusive_group(required=True)
    target.add_argument("--http", metavar="URL")
    target.add_argument("--grpc", metavar="HOST:PORT")
    bench.add_argument("--concurrency", type=int, default=32)
    bench.add_argument("--requests", type=int, default=64)
    bench.add_argument("--prompt-len", type=int, default=16)
    bench.add_argument("--output-len", type=int, default=32)
    bench.add_argument("--rate", type=float, nargs="+", metavar="REQ_PER_S",
                       help="open loop: Poisson arrivals at these request rates, one run each")
    bench.add_argument("--spread", type=float, default=0.0,
                       help="random lengths: uniform in [L(1-spread), L(1+spread)] (default 0: exact lengths)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--json", action="store_true")
    bench.set_defaults(func=cmd_bench)

    ckpt = sub.add_parser("checkpoint", help="checkpoint tools").add_subparsers(dest="action", required=True)
    rnd = ckpt.add_parser("random", help="write a random-weight checkpoint in the released layout")
    rnd.add_argument("--config", default=DEFAULT_CONFIG)
    rnd.add_argument("--out")
    rnd.add_argument("--seed", type=int, default=0)
    rnd.add_argument("--record-module", default="__main__", choices=["__main__", "model"])
    rnd.set_defaults(func=cmd_checkpoint_random)
    ins = ckpt.add_parser("inspect", help="load and check a checkpoint against a config")
    ins.add_argument("directory")
    ins.add_argument("--config", default=DEFAULT_CONFIG)
    ins.set_defaults(func=cmd_checkpoint_inspect)
    cnv = ckpt.add_parser("convert", help="convert a released-layout checkpoint to the sliceable format")
    cnv.add_argument("src", help="directory holding ckpt-0/ (or ckpt-0 itself)")
    cnv.add_argument("dst", help="output directory (grok1.sliceable_format)")
    cnv.add_argument("--config", default=DEFAULT_CONFIG)
    cnv.set_defaults(func=cmd_checkpoint_convert)

    cfg = sub.add_parser("config", help="config tools").add_subparsers(dest="action", required=True)
    show = cfg.add_parser("show", help="print a validated config with derived sizes")
    show.add_argument("config")
    show.set_defaults(func=cmd_config_show)

    pln = sub.add_parser("plan", help="lay a replica over hosts x devices: bytes per device, largest slot count")
    pln.add_argument("--config", default=DEFAULT_CONFIG)
    pln.add_argument("--hosts", type=int, default=1)
    pln.add_argument("--devices-per-host", type=int, default=1)
    pln.add_argument("--device-memory", required=True, help="per device, e.g. 80GiB, 141GB, 512MiB")
    pln.add_argument("--slots", type=int, help="decode slots to check (default: the config's engine.max_slots)")
    pln.add_argument("--max-len", type=int, help="KV-cache length per slot (default: the config's)")
    pln.add_argument("--ep", type=int, help="expert-parallel size (default: chosen, see planning/mesh_choice.py)")
    pln.add_argument("--tp", type=int, help="tensor-parallel size (default: chosen)")
    pln.add_argument("--memory-fraction", type=float,
                     help="share of device memory JAX may use: XLA_PYTHON_CLIENT_MEM_FRACTION (default 0.75)")
    pln.add_argument("--mean-len", type=int, default=1024,
                     help="mean tokens per sequence (prompt + output) for the paged cache's concurrency (1024)")
    pln.add_argument("--json", action="store_true")
    pln.set_defaults(func=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"grok1: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
