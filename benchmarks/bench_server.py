"""Load test of ``slot-cpp serve``: one client at a time, then many at once.

Starts the server in a subprocess (the embedded Gemma 3 270M unless --model),
then drives it with asynchronous httpx clients sending streamed completions
for --seconds each phase:

- sequential: one client, one request after another;
- concurrent: --clients clients, each sending its next request as soon as the
  previous one ends.

Reports requests, errors, lost requests (sent but never answered), latency
and time-to-first-token percentiles, and aggregate generated tokens per
second; the ratio concurrent / sequential is the gain from continuous
batching. A third concurrent phase sends every third request with a JSON
schema (llama-server's ``json_schema`` body field: constrained decoding).
``--llama-server PATH`` runs the same concurrent loads against llama.cpp's own
server binary for comparison, and ``--llama-cpp-python PYTHON`` against
llama-cpp-python's server run by that interpreter (its completions take the
schema as GBNF in ``grammar``, converted by slot_cpp).

    python benchmarks/bench_server.py --clients 32 --seconds 60 --threads 2 --n-parallel 8

With ``--rounds N`` (default 3) the servers run N times in alternating order;
the table shows each run's median round, and the ratios are the medians of
the rounds' ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import httpx
import numpy as np

import slot_cpp
from slot_cpp import _core

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

PROMPTS = [
    "Write a short story about a robot who learns to paint.",
    "Explain why the sky is blue in simple words.",
    "List some good habits for staying healthy.",
    "Describe a day at the beach.",
    "What makes a good friend?",
    "Tell me about the history of bread.",
    "Describe how a bicycle works.",
    "Write a letter to a future self.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(url: str, proc: subprocess.Popen, path: str, timeout: float = 300.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + path, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError("the server did not become ready")


SCHEMA = {
    "type": "object",
    "properties": {"title": {"type": "string", "maxLength": 60}, "points": {"type": "array", "maxItems": 4,
                                                                          "items": {"type": "string"}}},
    "required": ["title", "points"],
}


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, max_tokens: int,
                      seed: int, constraint: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    # The sampler settled explicitly (llama-server's defaults), so that every
    # server does the same work per token whatever its own defaults.
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "top_k": 40,
            "top_p": 0.95, "min_p": 0.05, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    if constraint:
        body.update(constraint)
    t0 = time.perf_counter()
    first: Optional[float] = None
    tokens = 0
    pieces = 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"ok": False, "status": r.status_code, "latency": time.perf_counter() - t0}
        done = False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if "error" in chunk:
                return {"ok": False, "status": chunk["error"].get("status", 500),
                        "latency": time.perf_counter() - t0}
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
            for choice in chunk.get("choices", []):
                if choice.get("text"):
                    pieces += 1
                    if first is None:
                        first = time.perf_counter() - t0
        if not done:
            return {"ok": False, "status": "truncated", "latency": time.perf_counter() - t0}
    return {"ok": True, "latency": time.perf_counter() - t0, "ttft": first if first is not None else np.nan,
            "tokens": tokens or pieces}


async def phase(url: str, model: str, clients: int, seconds: float, max_tokens: int,
                schema_every: int = 0, constraint: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    constraint = constraint or {"json_schema": SCHEMA}
    records: list[dict[str, Any]] = []
    sent = 0
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker(w: int) -> None:
            nonlocal sent
            k = 0
            while time.perf_counter() < deadline:
                sent += 1
                try:
                    rec = await one_request(client, url, model, PROMPTS[(w + k) % len(PROMPTS)], max_tokens,
                                            seed=1000 * w + k,
                                            constraint=constraint if schema_every > 0 and (w + k) % schema_every == 0
                                            else None)
                except httpx.HTTPError as exc:
                    rec = {"ok": False, "status": type(exc).__name__, "latency": np.nan}
                records.append(rec)
                k += 1

        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(clients)))
        wall = time.perf_counter() - t0
    ok = [r for r in records if r["ok"]]
    lat = np.array([r["latency"] for r in ok]) if ok else np.array([np.nan])
    ttft = np.array([r["ttft"] for r in ok]) if ok else np.array([np.nan])
    tokens = sum(r["tokens"] for r in ok)
    return {
        "clients": clients, "wall_s": wall, "requests": len(records), "ok": len(ok),
        "errors": len(records) - len(ok), "lost": sent - len(records),
        "statuses": sorted({str(r.get("status")) for r in records if not r["ok"]}),
        "tokens": tokens, "tokens_per_s": tokens / wall,
        "latency_p50_s": float(np.nanpercentile(lat, 50)), "latency_p99_s": float(np.nanpercentile(lat, 99)),
        "ttft_p50_s": float(np.nanpercentile(ttft, 50)), "ttft_p99_s": float(np.nanpercentile(ttft, 99)),
    }


def start_slot_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "slot_cpp", "serve", "--port", str(port), "--threads", str(args.threads),
           "--n-parallel", str(args.n_parallel), "--n-ctx", str(args.n_ctx), "--max-waiting",
           str(args.clients + 8), "--model-id", "bench", "--quiet"]
    if args.model:
        cmd += ["--model", args.model]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def start_llama_server(args: argparse.Namespace, port: int, model_path: str) -> subprocess.Popen:
    cmd = [args.llama_server, "-m", model_path, "--port", str(port), "-t", str(args.threads), "-np",
           str(args.n_parallel), "-c", str(args.n_ctx), "--alias", "bench", "--log-disable", "-cb"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def start_llama_cpp_python(args: argparse.Namespace, port: int, model_path: str) -> subprocess.Popen:
    cmd = [args.llama_cpp_python, "-m", "llama_cpp.server", "--model", model_path, "--host", "127.0.0.1", "--port",
           str(port), "--n_threads", str(args.threads), "--n_ctx", str(args.n_ctx), "--model_alias", "bench",
           # By default a new request interrupts the stream being served; queue them instead, as the others do.
           "--interrupt_requests", "False"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="GGUF path (default: the embedded Gemma 3 270M)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-parallel", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=8192)
    ap.add_argument("--llama-server", default=None, help="path of llama.cpp's llama-server, for comparison")
    ap.add_argument("--llama-cpp-python", default=None,
                    help="a Python with llama-cpp-python[server] installed, for comparison")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds; ratios are their medians")
    ap.add_argument("--out", default=str(RESULTS / "bench_server"))
    args = ap.parse_args()

    results: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "out"}}
    model_path = args.model or str(slot_cpp.default_model_path())
    servers: list[tuple[str, Any, str, dict[str, Any]]] = [
        ("slot_cpp", lambda a, port, _: start_slot_server(a, port), "/health", {"json_schema": SCHEMA})]
    if args.llama_server:
        servers.append(("llama_server", start_llama_server, "/health", {"json_schema": SCHEMA}))
    if args.llama_cpp_python:
        # Its completions take a grammar, not a schema: the same schema as GBNF.
        gbnf = _core.json_schema_to_grammar(json.dumps(SCHEMA))
        servers.append(("llama_cpp_python", start_llama_cpp_python, "/v1/models", {"grammar": gbnf}))
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        # Alternating the order, so that neither server always runs on a warmer (or hotter) machine.
        order = servers if r % 2 == 0 else servers[::-1]
        got: dict[str, Any] = {}
        for name, start, ready, constraint in order:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            proc = start(args, port, model_path)
            try:
                wait_ready(url, proc, ready)
                asyncio.run(phase(url, "bench", 1, 5.0, args.max_tokens))  # warm-up
                if name == "slot_cpp" and r == 0:
                    results["slot_cpp_sequential"] = asyncio.run(phase(url, "bench", 1, args.seconds,
                                                                       args.max_tokens))
                got[f"{name}_concurrent"] = asyncio.run(phase(url, "bench", args.clients, args.seconds,
                                                              args.max_tokens))
                got[f"{name}_concurrent_schema"] = asyncio.run(
                    phase(url, "bench", args.clients, args.seconds, args.max_tokens, schema_every=3,
                          constraint=constraint))
            finally:
                stop(proc)
        rounds.append(got)
    results["rounds"] = rounds
    # Each run's figures: the round with the median throughput.
    for key in rounds[0]:
        ranked = sorted(rounds, key=lambda g: g[key]["tokens_per_s"])
        results[key] = ranked[len(ranked) // 2][key]

    def median_ratio(key: str, other: str) -> float:
        return float(np.median([g[key]["tokens_per_s"] / g[other]["tokens_per_s"] for g in rounds]))

    seq, conc = results["slot_cpp_sequential"], results["slot_cpp_concurrent"]
    results["concurrent_over_sequential"] = conc["tokens_per_s"] / seq["tokens_per_s"]
    if "llama_server_concurrent" in results:
        results["slot_cpp_over_llama_server"] = median_ratio("slot_cpp_concurrent", "llama_server_concurrent")
        results["slot_cpp_over_llama_server_schema"] = median_ratio("slot_cpp_concurrent_schema",
                                                                    "llama_server_concurrent_schema")
        results["ttft_p50_slot_cpp_over_llama_server"] = float(np.median(
            [g["slot_cpp_concurrent"]["ttft_p50_s"] / g["llama_server_concurrent"]["ttft_p50_s"] for g in rounds]))

    rows = [("slot_cpp, 1 client at a time", seq), (f"slot_cpp, {args.clients} clients", conc),
            (f"slot_cpp, {args.clients} clients, a third with a JSON schema", results["slot_cpp_concurrent_schema"])]
    if "llama_server_concurrent" in results:
        rows.append((f"llama-server, {args.clients} clients", results["llama_server_concurrent"]))
        rows.append((f"llama-server, {args.clients} clients, a third with a JSON schema",
                     results["llama_server_concurrent_schema"]))
    if "llama_cpp_python_concurrent" in results:
        rows.append((f"llama-cpp-python, {args.clients} clients", results["llama_cpp_python_concurrent"]))
        rows.append((f"llama-cpp-python, {args.clients} clients, a third with the schema's grammar",
                     results["llama_cpp_python_concurrent_schema"]))
        results["slot_cpp_over_llama_cpp_python"] = median_ratio("slot_cpp_concurrent",
                                                                 "llama_cpp_python_concurrent")
    lines = ["| run | requests | errors | lost | tokens/s | latency p50 (s) | latency p99 (s) | TTFT p50 (s) "
             "| TTFT p99 (s) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows:
        lines.append(f"| {name} | {r['requests']} | {r['errors']} | {r['lost']} | {r['tokens_per_s']:.1f} | "
                     f"{r['latency_p50_s']:.2f} | {r['latency_p99_s']:.2f} | {r['ttft_p50_s']:.2f} | "
                     f"{r['ttft_p99_s']:.2f} |")
    lines.append("")
    lines.append(f"Concurrent / sequential throughput: {results['concurrent_over_sequential']:.2f}x")
    if "slot_cpp_over_llama_server" in results:
        lines.append(f"slot_cpp / llama-server throughput ({args.clients} clients, median of {args.rounds} "
                     f"alternating rounds): {results['slot_cpp_over_llama_server']:.2f}x; with a third "
                     f"JSON-schema requests: {results['slot_cpp_over_llama_server_schema']:.2f}x; TTFT p50 "
                     f"ratio {results['ttft_p50_slot_cpp_over_llama_server']:.2f}")
    if "slot_cpp_over_llama_cpp_python" in results:
        lines.append(f"slot_cpp / llama-cpp-python throughput ({args.clients} clients): "
                     f"{results['slot_cpp_over_llama_cpp_python']:.2f}x")
    table = "\n".join(lines)
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
