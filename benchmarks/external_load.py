"""Latency vs request rate over HTTP with an established load generator: NVIDIA's AIPerf (`aiperf profile`).

Why AIPerf: of the generators on the package index it is the one that installs and runs here offline. vLLM's
`vllm bench serve` needs all of vLLM; guidellm 0.8.1 depends on torch (with CUDA wheels, gigabytes); AIPerf needs
no torch, and takes a local tokenizer directory, which we build from the SentencePiece `tokenizer.model` (no
Hugging Face hub). It pins its own prometheus-client, so it lives in its own virtualenv (`make bench` creates
.venv-aiperf; `$AIPERF` names another executable).

Each rate is one `aiperf profile` run: open loop (`--arrival-pattern poisson`, AIPerf's default),
synthetic prompts of `prompt_len` tokens and `output_len` generated tokens, each normal with a standard
deviation of a quarter of the mean (ours are uniform over +-50%: the same mean, a similar spread; ignore_eos),
streaming completions; its JSON export gives TTFT, ITL and request latency p50 / p99 and throughput.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".venv-aiperf"
RUN_TIMEOUT_S = 1800
# transformers converts a SentencePiece model found beside this config to its fast tokenizer: the same ids.
TOKENIZER_CONFIG = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "add_eos_token": False,
                    "legacy": False}


@dataclass
class ExternalResult:
    tool: str
    rows: list[dict]

    @property
    def table(self) -> str:
        head = f"{'rate':>7} {'reqs':>5} {'tok/s':>8} {'req/s':>6} {'TTFT p50/p99 ms':>17} {'ITL p50/p99 ms':>17} " \
               f"{'E2E p50/p99 ms':>17}"
        lines = [head]
        for r in self.rows:
            lines.append(f"{r['rate']:>5g}/s {r['requests']:>5} {r['tokens_per_s']:>8.1f} {r['requests_per_s']:>6.2f} "
                         f"{r['ttft_p50_ms']:>8.1f}/{r['ttft_p99_ms']:<8.1f} "
                         f"{r['itl_p50_ms']:>8.2f}/{r['itl_p99_ms']:<8.2f} "
                         f"{r['e2e_p50_ms']:>8.1f}/{r['e2e_p99_ms']:<8.1f}")
        return "\n".join(lines)


def aiperf_executable() -> str | None:
    explicit = os.environ.get("AIPERF")
    if explicit:
        return explicit if Path(explicit).exists() else None
    candidate = VENV / "bin" / "aiperf"
    return str(candidate) if candidate.exists() else shutil.which("aiperf")


def tokenizer_dir(into: Path) -> Path:
    """A Hugging Face tokenizer directory (in a temporary folder, never the repository) for AIPerf's
    transformers: the SentencePiece model and a config naming its class; no hub."""
    from grok1.tokenizer import resolve_tokenizer_path

    into.mkdir(parents=True)
    shutil.copy(resolve_tokenizer_path(), into / "tokenizer.model")
    (into / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG))
    return into


def _metric(data: dict, name: str, stat: str) -> float:
    return float(data[name][stat])


def parse_export(data: dict, rate: float, requests: int) -> dict:
    """One row from AIPerf's profile_export_aiperf.json (milliseconds, as it reports them)."""
    return {"rate": rate, "requests": requests,
            "tokens_per_s": _metric(data, "output_token_throughput", "avg"),
            "requests_per_s": _metric(data, "request_throughput", "avg"),
            "ttft_p50_ms": _metric(data, "time_to_first_token", "p50"),
            "ttft_p99_ms": _metric(data, "time_to_first_token", "p99"),
            "itl_p50_ms": _metric(data, "inter_token_latency", "p50"),
            "itl_p99_ms": _metric(data, "inter_token_latency", "p99"),
            "e2e_p50_ms": _metric(data, "request_latency", "p50"),
            "e2e_p99_ms": _metric(data, "request_latency", "p99")}


def run(url: str, model: str, rates: list[float], requests: int, prompt_len: int,
        output_len: int) -> ExternalResult | None:
    """One AIPerf run per rate against the OpenAI-compatible `url`; None (and a note) when it is not installed."""
    aiperf = aiperf_executable()
    if aiperf is None:
        print("AIPerf is not installed (make bench installs it into .venv-aiperf): skipping its table")
        return None
    rows = []
    with tempfile.TemporaryDirectory(prefix="grok1-aiperf-") as work:
        tokenizer = tokenizer_dir(Path(work) / "tokenizer")
        for rate in rates:
            out = Path(work) / f"rate-{rate:g}"
            command = [aiperf, "profile", "--model", model, "--url", url, "--endpoint-type", "completions",
                       "--streaming", "--tokenizer", str(tokenizer), "--request-rate", f"{rate:g}",
                       "--arrival-pattern", "poisson",
                       "--request-count", str(requests), "--random-seed", "2",
                       "--synthetic-input-tokens-mean", str(prompt_len),
                       "--synthetic-input-tokens-stddev", str(prompt_len / 4),
                       "--output-tokens-mean", str(output_len), "--output-tokens-stddev", str(output_len / 4),
                       "--extra-inputs", "ignore_eos:true", "--artifact-dir", str(out)]
            # Not HF_HUB_OFFLINE: AIPerf 0.13 then looks a local path up in the hub's cache and fails; a local
            # directory is read without the network either way.
            done = subprocess.run(command, timeout=RUN_TIMEOUT_S, capture_output=True, text=True)
            exports = list(out.rglob("profile_export_aiperf.json"))
            if done.returncode != 0 or not exports:  # reported, not raised: the other tables still print
                tail = (done.stdout + done.stderr)[-3000:]
                print(f"AIPerf failed at rate {rate:g} (exit {done.returncode}):\n{tail}")
                return ExternalResult("AIPerf (aiperf profile)", rows) if rows else None
            export = exports[0]
            rows.append(parse_export(json.loads(export.read_text()), rate, requests))
    return ExternalResult("AIPerf (aiperf profile)", rows)
