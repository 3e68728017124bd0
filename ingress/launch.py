"""`grok1 serve`: start (or join) a Ray cluster, run the Serve application, wait for the weights, print the
ready line, and block until Ctrl-C.

A local Ray instance is started unless $RAY_ADDRESS names an existing cluster (`ray start --head` there, or
`auto`). While it starts it prints where the replica is (ingress/start_progress.py); a replica that cannot
start ends it at once with status 1 and the reason. The gRPC proxy needs the stubs importable on every node:
`pip install -e .` puts `grok1_api` on the path (the Docker image does the same).
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Mapping

from ingress.serving_config import ServingConfig

APP_NAME = "grok1"


def ready_line(model: str, http_host: str, http_port: int, grpc_port: int, ep: int, tp: int) -> str:
    host = "127.0.0.1" if http_host in ("0.0.0.0", "::") else http_host
    url = f"http://{host}:{http_port}"
    return (f"grok1-serve ready: {model} (ep={ep} tp={tp}), HTTP {url}  gRPC {host}:{grpc_port}\n"
            f"  curl {url}/v1/completions -H 'Content-Type: application/json' "
            f"-d '{{\"prompt\": \"The answer to life the universe and everything is\", \"max_tokens\": 16}}'\n"
            f"  grok1 generate \"The answer to life the universe and everything is\" --http {url} --stream\n"
            f"  grok1 generate \"The answer to life the universe and everything is\" --grpc {host}:{grpc_port}")


def start_serving(app_args: ServingConfig | Mapping, *, http_host: str = "127.0.0.1", http_port: int = 8000,
                  grpc_port: int = 9000, ray_address: str | None = None, ready_timeout_s: float = 1800,
                  num_cpus: int | None = None, direct_ingress: bool = False):
    """Start Ray (or join `ray_address` / $RAY_ADDRESS) and Serve, run the app, wait until it serves.

    `app_args`: the serving config, or overrides of it (build_app's arguments). `direct_ingress`: the replica
    itself serves `http_port` and `grpc_port` (ingress/direct_ingress.py), and Serve's proxy takes two free
    ports. Returns the router actor."""
    import ray
    from ray import serve

    from ingress.app import build_app, serve_options
    from ingress.direct_ingress import DirectIngress, wait_listening
    from ingress.edge import apply_proxy_env
    from ingress.start_progress import StartFailed, deployment_failure, watch

    serving = ServingConfig.of(app_args)
    address = ray_address or os.environ.get("RAY_ADDRESS") or "local"
    direct = DirectIngress(http_port, grpc_port, serving.num_replicas) if direct_ingress else None
    if address == "local":
        apply_proxy_env()  # an existing cluster's nodes need it in their own environment (docs/deploy.md)
        if direct:
            os.environ.update(direct.env())  # the same: before `ray start` on each node
    started = time.monotonic()
    if not ray.is_initialized():
        _say(f"starting Ray ({'a local instance' if address == 'local' else address}) ...")
        ray.init(address=address, num_cpus=num_cpus if address == "local" else None,
                 include_dashboard=False, log_to_driver=False)
    proxy_ports = (free_port(), free_port()) if direct else (http_port, grpc_port)
    serve.start(**serve_options(http_host, *proxy_ports))
    _say(f"deploying {serving.num_replicas} replica(s) of ep={serving.ep} tp={serving.tp} ...")
    try:  # serve.run waits for the replicas' constructors: one that raises fails it with Serve's summary
        handle = serve.run(build_app(serving), name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as err:
        raise StartFailed(deployment_failure(APP_NAME) or str(err)) from err
    router = watch(handle, APP_NAME, ready_timeout_s)
    if direct:
        if address == "local":  # on a cluster the replicas listen on their own nodes, wherever Ray put them
            try:
                wait_listening(http_host, http_port, timeout_s=60)
            except TimeoutError as err:
                raise StartFailed(str(err)) from err
        _say(f"direct ingress: the replicas serve HTTP :{http_port} and gRPC :{grpc_port} on their nodes; "
             f"Serve's proxy: HTTP :{proxy_ports[0]}, gRPC :{proxy_ports[1]}")
    _say(f"started in {time.monotonic() - started:.1f}s")
    return router


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def serve_forever(serving: ServingConfig, *, http_host: str, http_port: int, grpc_port: int, model: str,
                  direct_ingress: bool = False) -> int:
    from ray import serve

    from ingress.start_progress import StartFailed

    try:
        start_serving(serving, http_host=http_host, http_port=http_port, grpc_port=grpc_port,
                      direct_ingress=direct_ingress)
    except StartFailed as err:
        print(f"grok1: error: the replica cannot start: {err}", file=sys.stderr, flush=True)
        serve.shutdown()
        return 1
    print(ready_line(model, http_host, http_port, grpc_port, serving.ep, serving.tp), flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("shutting down (Ctrl-C again to stop at once)", file=sys.stderr)
        try:
            serve.shutdown()
        except KeyboardInterrupt:
            pass
    return 0
