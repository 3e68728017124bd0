"""The tiny overlay's Serve application, started locally from the manifest itself (docs/deploy.md).

tests/test_deploy.py checks k8s/overlays/cpu-tiny's `serveConfigV2` against Serve's schema and the project's
code without running it; this test runs it. It renders the overlay with real kustomize (test_deploy's
helpers), takes the RayService's `spec.serveConfigV2`, changes only what cannot be the same on a laptop (see
`laptop_config`), starts a private Ray cluster with `ray start --head`, and hands the file to Serve's own CLI:

    serve run CONFIG.yaml --address 127.0.0.1:GCS_PORT --non-blocking

Why `serve run` with the config file: for a file, Ray 2.60's `serve run` (ray/serve/scripts.py) validates it
as a `ServeDeploySchema`, calls `serve_start(http_options=config.http_options, proxy_location=...,
grpc_options=config.grpc_options)` and then `client.deploy_apps(config)`. That is the code path KubeRay takes
through the dashboard's `PUT /api/serve/applications/` (dashboard/modules/serve/serve_head.py: the same
schema, `serve_start_async` with the config's http/grpc options, `client.deploy_apps`), so the gRPC proxy
gets the manifest's `grpc_servicer_functions` and the controller imports `import_path` with `args` in a Ray
task on the cluster, as in the pod. `serve deploy` would add the dashboard (a REST hop and a process that
costs CPU here) and nothing the application sees. `--non-blocking` returns once the config is submitted;
the application then builds and loads on the cluster while the test polls it.

The Ray processes run where the image runs them: the working directory stands in for the image's
WORKDIR /opt/grok1-serve, which holds the checkout without `checkpoints/` (docker/Dockerfile.dockerignore),
so relative paths in the manifest (`config: configs/...`, the config's `checkpoint.path`) resolve as they
do in the pod, and `random_if_missing` writes the random tiny checkpoint into this test's temporary
directory, as a fresh pod does, instead of into the checkout. PYTHONPATH is the checkout (the image sets
it to its copy) and GROK1_TOKENIZER the tokenizer this checkout finds (the image sets it to its own).

Teardown never uses `ray stop`, which kills every Ray process of the user on the machine (other people's
clusters included): it ends the processes of this cluster only, found by their process group (everything
is started in a new session) and by this cluster's unique temporary directory on their command line.
Every wait is bounded.
"""

from __future__ import annotations

import copy
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml

from tests.deploy.test_deploy import ROOT, serve_config, the

pytestmark = pytest.mark.slow

OVERLAY = "overlays/cpu-tiny"
BIN = Path(sys.executable).parent  # the venv's `ray` and `serve` scripts (not resolved: a venv's python is a link)
RAY_START_TIMEOUT_S = 120
SERVE_RUN_TIMEOUT_S = 180  # connect, start the controller and both proxies, submit the config
READY_TIMEOUT_S = 420  # build_app (a random checkpoint), router, shard worker, JAX compiles, a 1-token probe
STATUS_EVERY_S = 30  # how often, while waiting, Serve's status is read to fail fast on DEPLOY_FAILED
REQUEST_TIMEOUT_S = 120
# Teardown, as `ray stop` does it (SIGTERM, a grace period, SIGKILL) but for this cluster's processes only. The
# raylet, GCS and Serve's actors take longer than this to stop on SIGTERM (`ray start --block` drains the
# node for up to 30 s first); nothing of a throwaway cluster needs saving, so the grace is short.
STOP_GRACE_S = 10
KILL_TIMEOUT_S = 30


def _free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 now (all bound at once, so no two are the same)."""
    with ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(count)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


API_KEY = "test-key-0123456789abcdef"  # written into the test's own key file, nowhere else


def laptop_config(config: dict, http_port: int, grpc_port: int, scratch: Path) -> dict:
    """The manifest's serveConfigV2 with only what must differ on a laptop rewritten:

    - `http_options.host` 0.0.0.0 -> 127.0.0.1 and `http_options.port` 8000 -> a free port: the pod's network
      namespace is its own, this machine's is shared (8000 may be taken), and nothing outside should reach it;
    - `grpc_options.port` 9000 -> a free port, for the same reason (Serve's gRPC proxy has no host option);
    - `applications[*].args.checkpoint`, only if the args name one that does not exist here (a path on the
      pod's weights volume): a directory under `scratch`, where `random_if_missing` (which must then already
      be true) writes a random checkpoint. The tiny overlay names none: its checkpoint is the config's
      relative `checkpoint.path`, which resolves under the working directory as in the pod (module docstring);
    - `applications[*].args.api_key_file` (the pod's mounted Secret, which the manifest must set): a file under
      `scratch` holding API_KEY, in the Secret's format (one key per line, `#` comments), so the application
      runs with keys required, as in the pod.

    import_path, every other argument (config, ep, tp, placement_strategy, random_if_missing, max_queue),
    route_prefix, proxy_location and grpc_servicer_functions stay exactly as the manifest has them.
    """
    local = copy.deepcopy(config)
    local["http_options"]["host"] = "127.0.0.1"
    local["http_options"]["port"] = http_port
    local["grpc_options"]["port"] = grpc_port
    for app in local["applications"]:
        args = app.get("args") or {}
        if "checkpoint" in args and not Path(args["checkpoint"]).exists():
            assert args.get("random_if_missing") is True, (
                f"{app['name']}: checkpoint {args['checkpoint']} exists only in the pod and random_if_missing is "
                f"not true, so this application cannot start here")
            args["checkpoint"] = str(scratch / "checkpoint")
        assert args.get("api_key_file"), f"{app['name']}: the manifest serves without API keys"
        key_file = scratch / "api-keys"
        key_file.write_text(f"# the test's only key\n\n{API_KEY}\n")
        args["api_key_file"] = str(key_file)
    return local


def _pod_env(manifest: dict) -> dict[str, str]:
    """The environment the overlay gives its Ray containers (all must agree: one local head plays them all)."""
    cluster = manifest["spec"]["rayClusterConfig"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    envs = [{e["name"]: e["value"] for e in c.get("env", []) if e["name"].startswith("RAY_SERVE_")}
            for pod in pods for c in pod["containers"]]
    assert all(env == envs[0] for env in envs), envs
    return envs[0]


def _subprocess_env(tokenizer: Path, pod_env: dict[str, str]) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("RAY_")}
    env.update(pod_env)  # the Serve proxies' settings, as the pods set them
    # RAY_AUTH_MODE: `ray start` turns token authentication on when ~/.ray/auth_token exists (a local
    # `ray.init()` writes one), while a client given an explicit address never does; the pod's `ray start`
    # finds no token. Said explicitly, so that a token someone left in ~ changes nothing here.
    env.update(PYTHONPATH=str(ROOT), GROK1_TOKENIZER=str(tokenizer), RAY_USAGE_STATS_ENABLED="0",
               RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    return env


def _die_with_parent() -> None:
    """In the child: SIGKILL when the test process dies, however it dies (Linux's PR_SET_PDEATHSIG). `ray start
    --block` starts the GCS and raylet the same way, and Ray's workers exit without their raylet, so a killed
    pytest leaves no cluster behind either."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as err:
        return f"({path}: {err})"


class LocalCluster:
    """A private Ray head (`ray start --head --block`) and everything started against it; `stop()` ends
    exactly these processes, with bounded waits."""

    def __init__(self, workdir: Path, env: dict[str, str]):
        self.workdir = workdir
        self.env = env
        # Short and unique: Ray's socket paths live under it (a Unix socket path has ~107 bytes).
        self.temp_dir = Path(tempfile.mkdtemp(prefix="g1srv-", dir="/tmp"))
        self.logs = workdir.parent / "logs"
        self.logs.mkdir(exist_ok=True)
        self.processes: list[subprocess.Popen] = []
        (self.gcs_port, self.node_manager_port, self.object_manager_port, self.client_port, self.agent_port,
         self.agent_grpc_port, self.runtime_env_port, self.metrics_port, self.dashboard_port) = _free_ports(9)
        self.address = f"127.0.0.1:{self.gcs_port}"

    def popen(self, args: list[str], log_name: str) -> subprocess.Popen:
        log = open(self.logs / log_name, "wb")
        try:
            process = subprocess.Popen(args, cwd=self.workdir, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=_die_with_parent)
        finally:
            log.close()
        self.processes.append(process)
        return process

    def start(self) -> None:
        head = self.popen([
            str(BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats", "--num-cpus", "4",
            "--num-gpus", "0", "--port", str(self.gcs_port),
            "--node-manager-port", str(self.node_manager_port),
            "--object-manager-port", str(self.object_manager_port),
            "--ray-client-server-port", str(self.client_port),
            "--dashboard-agent-listen-port", str(self.agent_port),
            "--dashboard-agent-grpc-port", str(self.agent_grpc_port),
            "--runtime-env-agent-port", str(self.runtime_env_port),
            "--metrics-export-port", str(self.metrics_port),
            "--include-dashboard", "false", "--dashboard-port", str(self.dashboard_port),
            "--object-store-memory", str(256 << 20),  # the overlay's rayStartParams
            "--temp-dir", str(self.temp_dir)], "ray-start.log")
        deadline = time.monotonic() + RAY_START_TIMEOUT_S
        while "Ray runtime started" not in (self.logs / "ray-start.log").read_text(errors="replace"):
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"`ray start --head` did not come up (exit {head.poll()}):\n"
                            f"{_tail(self.logs / 'ray-start.log')}", pytrace=False)
            time.sleep(0.5)

    def serve_status(self) -> str:
        """Serve's status of every application, as YAML text (a short-lived driver on the cluster)."""
        code = ("import ray, yaml\nfrom ray import serve\n"
                f"ray.init(address={self.address!r}, namespace='serve', log_to_driver=False, logging_level='ERROR')\n"
                "status = serve.status()\n"
                "print(yaml.safe_dump({name: {'status': str(app.status), 'message': app.message, 'deployments': "
                "{d: {'status': str(s.status), 'message': s.message} for d, s in app.deployments.items()}} "
                "for name, app in status.applications.items()}))\n")
        try:
            result = subprocess.run([sys.executable, "-c", code], cwd=self.workdir, env=self.env, capture_output=True,
                                    text=True, timeout=60, start_new_session=True)
        except subprocess.TimeoutExpired:
            return "(serve status timed out)"
        return result.stdout if result.returncode == 0 else f"(serve status failed)\n{result.stderr[-3000:]}"

    def diagnostics(self) -> str:
        serve_logs = sorted((self.temp_dir / "session_latest" / "logs" / "serve").glob("*"))
        controller = [path for path in serve_logs if path.name.startswith("controller_")]
        replicas = [path for path in serve_logs if path.name.startswith("replica_")]
        parts = [f"serve status:\n{self.serve_status()}"]
        parts += [f"--- {path.name}:\n{_tail(path)}" for path in (self.logs / "serve-run.log", *controller,
                                                                     *replicas)]
        return "\n".join(parts)

    def _our_processes(self) -> list:
        """This cluster's live processes: those in the sessions started here or naming its temporary directory,
        and all their descendants (Ray's workers, which the raylet starts in process groups of their own and
        which retitle themselves `ray::...`, are found only as the raylet's children)."""
        import psutil

        # Sessions of processes not yet reaped (a reaped leader's id may be anyone's now; its group's members
        # name the temporary directory anyway).
        groups = {process.pid for process in self.processes if process.returncode is None}
        marker = str(self.temp_dir)
        found = {}
        for process in psutil.process_iter(["pid", "cmdline"]):
            try:
                named = any(marker in arg for arg in process.info["cmdline"] or ())
                if process.pid != os.getpid() and (os.getpgid(process.pid) in groups or named):
                    found[process.pid] = process
                    found.update((child.pid, child) for child in process.children(recursive=True))
            except (OSError, psutil.Error):
                continue
        return [process for process in found.values() if _alive(process)]

    def stop(self) -> list[str]:
        """End every process of this cluster: SIGTERM, then SIGKILL what is left after STOP_GRACE_S.
        Returns what was still alive after that (nothing, normally)."""
        import shutil

        processes = self._our_processes()  # before any dies: a dead raylet's workers are nobody's children
        for process in processes:
            with_suppressed(process.terminate)
        alive = _wait_gone(processes, STOP_GRACE_S)
        alive = {p.pid: p for p in alive + self._our_processes()}.values()
        for process in alive:
            with_suppressed(process.kill)
        alive = _wait_gone(list(alive), KILL_TIMEOUT_S)
        for process in self.processes:  # reap the direct children
            with_suppressed(process.wait, timeout=5)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        return [f"{p.pid} {' '.join(with_suppressed(p.cmdline) or [])[:200]}" for p in alive]


def _alive(process) -> bool:
    """Running and not a zombie (a zombie has exited; only its parent can reap it)."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_gone(processes: list, timeout_s: float) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        alive = [process for process in processes if _alive(process)]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def with_suppressed(function, *args, **kwargs):
    try:
        return function(*args, **kwargs)
    except Exception:  # noqa: BLE001 - teardown goes on whatever one process did
        return None


@pytest.fixture
def tokenizer() -> Path:
    from grok1.tokenizer import TokenizerNotFound, resolve_tokenizer_path

    try:
        return resolve_tokenizer_path()
    except TokenizerNotFound as err:
        pytest.skip(str(err))


def test_tiny_overlay_serve_config_serves_http_and_grpc(tmp_path, tokenizer):
    import grpc
    import requests

    from grok1_api.v1 import grok1_pb2 as pb
    from grok1_api.v1 import grok1_pb2_grpc

    manifest = serve_config(the("RayService", OVERLAY))
    http_port, grpc_port = _free_ports(2)
    config = laptop_config(manifest, http_port, grpc_port, tmp_path)
    # Nothing but the keys laptop_config names differs from the manifest.
    rewritten = copy.deepcopy(config)
    rewritten["http_options"].update(host=manifest["http_options"]["host"], port=manifest["http_options"]["port"])
    rewritten["grpc_options"]["port"] = manifest["grpc_options"]["port"]
    for app, original in zip(rewritten["applications"], manifest["applications"]):
        if "checkpoint" in app.get("args", {}):
            app["args"]["checkpoint"] = original["args"]["checkpoint"]
        app["args"]["api_key_file"] = original["args"]["api_key_file"]
    assert rewritten == manifest
    (app,) = config["applications"]
    config_path = tmp_path / "serve-config.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    workdir = tmp_path / "grok1-serve"  # the image's WORKDIR: the checkout's configs/, no checkpoints/
    workdir.mkdir()
    (workdir / "configs").symlink_to(ROOT / "configs", target_is_directory=True)

    cluster = LocalCluster(workdir, _subprocess_env(tokenizer, _pod_env(the("RayService", OVERLAY))))
    try:
        cluster.start()
        serve_run = cluster.popen([str(BIN / "serve"), "run", str(config_path), "--address", cluster.address,
                                   "--non-blocking"], "serve-run.log")
        try:
            serve_run.wait(timeout=SERVE_RUN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"`serve run` did not return in {SERVE_RUN_TIMEOUT_S} s:\n{cluster.diagnostics()}",
                        pytrace=False)
        output = (cluster.logs / "serve-run.log").read_text(errors="replace")
        # `serve run` exits 0 even when it failed (it prints the error and calls sys.exit()): read what it said.
        assert serve_run.returncode == 0 and "Submitted deploy config successfully" in output, output[-5000:]

        http = f"http://127.0.0.1:{http_port}"
        auth = {"Authorization": f"Bearer {API_KEY}"}  # sent with every request; /health needs none by default
        deadline = time.monotonic() + READY_TIMEOUT_S
        next_status = time.monotonic() + STATUS_EVERY_S
        last = "no answer"
        while True:
            try:
                response = requests.get(f"{http}/health", headers=auth, timeout=35)
                if response.status_code == 200:
                    break
                last = f"{response.status_code} {response.text[:300]}"
            except requests.RequestException as err:
                last = f"{type(err).__name__}: {err}"
            if time.monotonic() > deadline:
                pytest.fail(f"GET /health not 200 after {READY_TIMEOUT_S} s (last: {last})\n{cluster.diagnostics()}",
                            pytrace=False)
            if time.monotonic() > next_status:
                status = cluster.serve_status()
                if "DEPLOY_FAILED" in status or "UNHEALTHY" in status:
                    pytest.fail(f"the application failed to deploy:\n{cluster.diagnostics()}", pytrace=False)
                next_status = time.monotonic() + STATUS_EVERY_S
            time.sleep(2)
        assert response.json()["ok"] is True

        completion = requests.post(f"{http}/v1/completions", json={"prompt": "The answer is", "max_tokens": 4},
                                   headers=auth, timeout=REQUEST_TIMEOUT_S)
        assert completion.status_code == 200, completion.text
        for headers in ({}, {"Authorization": "Bearer not-a-key"}):  # no key, a wrong key: refused
            refused = requests.post(f"{http}/v1/completions", json={"prompt": "The answer is", "max_tokens": 4},
                                    headers=headers, timeout=REQUEST_TIMEOUT_S)
            assert refused.status_code == 401, (headers, refused.status_code, refused.text[:300])
        body = completion.json()
        assert body["usage"]["completion_tokens"] == 4 and body["choices"][0]["finish_reason"] == "length", body
        assert isinstance(body["choices"][0]["text"], str)

        # Serve's gRPC proxy routes by the `application` metadata (the manifest's application name).
        unauthenticated = (("application", app["name"]),)
        metadata = (*unauthenticated, ("authorization", f"Bearer {API_KEY}"))
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = grok1_pb2_grpc.Grok1ServiceStub(channel)
            with pytest.raises(grpc.RpcError) as refused:
                stub.Generate(pb.GenerateRequest(text="The answer is", max_tokens=4), metadata=unauthenticated,
                              timeout=REQUEST_TIMEOUT_S)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
            health = stub.Health(pb.HealthRequest(probe=True), metadata=metadata, timeout=REQUEST_TIMEOUT_S)
            assert health.ok and health.state == "ready", health
            generated = stub.Generate(pb.GenerateRequest(text="The answer is", max_tokens=4), metadata=metadata,
                                      timeout=REQUEST_TIMEOUT_S)
        assert len(generated.token_ids) == 4 and generated.finish_reason == "length", generated
        assert generated.usage.completion_tokens == 4
        # Greedy by default, the same prompt: the same 4 tokens whichever proxy carried the request.
        assert generated.text == body["choices"][0]["text"]
        # random_if_missing wrote the random checkpoint where the pod would: the config's relative checkpoint.path.
        assert "checkpoint" in app["args"] or any((workdir / "checkpoints").glob("*/ckpt-0"))
    finally:
        left = cluster.stop()
    assert not left, f"processes of the test cluster still alive after teardown: {left}"
