"""Serve's direct ingress settings (ingress/direct_ingress.py): the environment Serve reads, the ports refused
before anything starts, and the bounded wait for the replica's own port. Behind real Ray Serve, the whole
ingress suite runs once more through direct ingress (tests/integration/test_ingress_serve.py, `[direct]`)."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest

from cli.main import main
from ingress.direct_ingress import DirectIngress, wait_listening


def test_env_gives_each_replica_of_a_node_one_port_and_it_back_on_restart():
    env = DirectIngress(8000, 9000, replicas_per_node=3).env()
    assert env["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    # Serve's pools are [min, max): 8000-8002 and 9000-9002, nothing else
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]) == \
        ("8000", "8003")
    assert (env["RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT"], env["RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT"]) == \
        ("9000", "9003")
    assert env["RAY_SERVE_PORT_QUARANTINE_S"] == "0"
    assert env["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] == "0"


@pytest.mark.parametrize("http_port, grpc_port, replicas, message", [
    (8000, 8001, 2, "overlap"),
    (8000, 8000, 1, "overlap"),
    (65535, 9000, 2, "out of range"),
    (0, 9000, 1, "out of range"),
    (8000, 9000, 0, "replicas_per_node"),
])
def test_bad_ports_are_refused(http_port, grpc_port, replicas, message):
    with pytest.raises(ValueError, match=message):
        DirectIngress(http_port, grpc_port, replicas)


def test_grok1_serve_refuses_overlapping_ports_before_starting_anything(capsys):
    assert main(["serve", "--direct-ingress", "--http-port", "8000", "--grpc-port", "8001",
                 "--replicas", "2"]) == 2
    assert "--direct-ingress" in capsys.readouterr().err


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_wait_listening_returns_once_health_answers_and_times_out_naming_the_port():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wait_listening("0.0.0.0", server.server_address[1], timeout_s=10)
    finally:
        server.shutdown()
        server.server_close()
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(TimeoutError, match=f":{port}/health"):
        wait_listening("127.0.0.1", port, timeout_s=0.5, interval_s=0.1)
