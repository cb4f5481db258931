"""Soak a real `slot-cpp serve` process with faults.

N concurrent clients for a duration, each request drawn from a mix: plain
and streamed completions and chat, SLOT, RTD and QAlign requests, streams the
client drops after the first chunk (mid-stream disconnects), requests the
client gives up on before the answer (cancels), malformed bodies, and more
requests than the server queues (overload: 503 with Retry-After is the
expected answer). Records errors by kind, lost requests (accepted but never
answered: a connection error or a timeout the client did not cause), latency
percentiles per time window and the server's resident memory over time.

    python benchmarks/soak_server.py --clients 32 --duration 1800          # the full soak
    python benchmarks/soak_server.py --clients 4 --duration 30 --model tiny.gguf   # a short one

Writes benchmarks/results/soak_server.json and soak_server.png (memory and
p99 latency over time) unless --out says otherwise. Exit status 1 when a
5xx or a lost request was seen.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Optional

import httpx
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
FACTS = [{"prompt": "The colour of the sky is", "completion": " blue, and the grass is green."},
         {"prompt": "Water boils at", "completion": " one hundred degrees Celsius."}]
PROMPTS = ["Once upon a time", "The capital of France is", "List three colours:", "Water boils at",
           "def fibonacci(n):", "The colour of the sky is"]
KINDS = {  # kind: weight
    "completion": 4, "chat": 3, "stream": 3, "slot": 2, "rtd": 2, "qalign": 1,
    "disconnect": 1, "cancel": 1, "malformed": 2,
}


def _free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def prepare(model_path: str, work: Path) -> tuple[str, str]:
    """A datastore of FACTS and a random reward head for the model."""
    import slot_cpp
    from slot_cpp.qalign import LinearReward
    from slot_cpp.rtd import Datastore

    with slot_cpp.Model(model_path, n_ctx=512, n_threads=2) as model:
        store = work / "facts.rtd"
        Datastore.build(model, FACTS, progress=False).save(store)
        rng = np.random.default_rng(0)
        head = LinearReward(model, rng.normal(size=model.n_embd) / np.sqrt(model.n_embd), 0.0).save(
            str(work / "head.npz"))
    return str(store), head


def start_server(model_path: str, store: str, head: str, *, n_parallel: int, max_waiting: int,
                 threads: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "slot_cpp", "serve", "--model", model_path, "--port", str(port),
                             "--n-ctx", "4096", "--n-parallel", str(n_parallel), "--threads", str(threads),
                             "--max-waiting", str(max_waiting), "--rtd", f"facts={store}",
                             "--reward", f"head=head:{head}", "--model-id", "soak", "--quiet",
                             "--max-tokens-cap", "256"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with code {proc.returncode}: {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise SystemExit("the server did not start")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)


def _body(kind: str, rng: random.Random) -> tuple[str, Any]:
    prompt = rng.choice(PROMPTS)
    base: dict[str, Any] = {"model": "soak", "max_tokens": rng.randint(1, 16), "temperature": rng.choice([0, 0.8]),
                            "seed": rng.randint(0, 1000)}
    if kind == "chat":
        return "/v1/chat/completions", {**base, "messages": [{"role": "user", "content": prompt}]}
    body = {**base, "prompt": prompt}
    if kind in ("stream", "disconnect"):
        body["stream"] = True
        body["max_tokens"] = rng.randint(8, 32)
    elif kind == "slot":
        body["slot"] = {"steps": rng.randint(1, 4), "lr": rng.choice([0.05, "auto"])}
    elif kind == "rtd":
        body["rtd"] = {"datastore": "facts", "lambda": rng.choice([0.2, 0.5])}
    elif kind == "qalign":
        body["qalign"] = {"reward": "head", "steps": rng.randint(2, 4)}
    elif kind == "cancel":
        body["max_tokens"] = 200
        body["ignore_eos"] = True
    return "/v1/completions", body


_MALFORMED: list[Any] = [b"{not json", b"", b"[]", {"prompt": 5}, {"prompt": "x", "max_tokens": -3},
                         {"prompt": "x", "temperature": "hot"}, {"prompt": "x", "slot": {"steps": 10**9}},
                         {"prompt": "x", "rtd": {"datastore": "nope"}}, {"messages": []},
                         {"prompt": "x", "unknown_field": 1}, {"prompt": "x", "qalign": {"reward": "nope"}}]


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[float, str, str, float]] = []   # (time, kind, outcome, latency)

    def add(self, t: float, kind: str, outcome: str, latency: float) -> None:
        with self.lock:
            self.events.append((t, kind, outcome, latency))


def client_loop(url: str, stats: Stats, stop: threading.Event, seed: int, t0: float) -> None:
    rng = random.Random(seed)
    kinds, weights = zip(*KINDS.items())
    with httpx.Client(timeout=httpx.Timeout(120.0, connect=10.0)) as http:
        while not stop.is_set():
            kind = rng.choices(kinds, weights)[0]
            start = time.monotonic()
            outcome = _one(http, url, kind, rng)
            stats.add(start - t0, kind, outcome, time.monotonic() - start)
            if outcome == "overload":
                stop.wait(1.0)   # as the official clients do: retry after the Retry-After header's second


def _status(code: int) -> str:
    if code == 200:
        return "ok"
    if code == 503:
        return "overload"
    return f"http{code}"


def _one(http: httpx.Client, url: str, kind: str, rng: random.Random) -> str:
    try:
        if kind == "malformed":
            bad = rng.choice(_MALFORMED)
            if isinstance(bad, bytes):
                r = http.post(url + "/v1/completions", content=bad, headers={"content-type": "application/json"})
            else:
                r = http.post(url + "/v1/chat/completions" if "messages" in bad else url + "/v1/completions",
                              json=bad)
            if r.status_code >= 500 and r.status_code != 503:
                return f"http{r.status_code}"
            if r.status_code == 503:
                return "overload"
            if r.status_code != 400 or "error" not in r.json():
                return f"malformed-answered-{r.status_code}"
            return "rejected"
        path, body = _body(kind, rng)
        if kind == "cancel":
            try:
                r = http.post(url + path, json=body, timeout=httpx.Timeout(rng.uniform(0.02, 0.3), connect=10.0))
            except httpx.TimeoutException:
                return "cancelled"
            return _status(r.status_code)
        if body.get("stream"):
            with http.stream("POST", url + path, json=body) as r:
                if r.status_code != 200:
                    return _status(r.status_code)
                done = False
                for line in r.iter_lines():
                    if kind == "disconnect" and line.startswith("data: "):
                        return "disconnected"   # closes the stream after the first chunk
                    if line.startswith("data: ") and '"error"' in line:
                        return "stream-error"
                    if line == "data: [DONE]":
                        done = True
                return "ok" if done else "stream-unfinished"
        r = http.post(url + path, json=body)
        if r.status_code == 200:
            data = r.json()
            if not data.get("choices"):
                return "bad-answer"
        return _status(r.status_code)
    except httpx.TimeoutException:
        return "lost-timeout"
    except httpx.HTTPError as exc:
        return f"lost-{type(exc).__name__}"


def rss_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def soak(url: str, pid: int, clients: int, duration: float, window: float) -> dict[str, Any]:
    stats = Stats()
    stop = threading.Event()
    t0 = time.monotonic()
    threads = [threading.Thread(target=client_loop, args=(url, stats, stop, 1000 + i, t0), daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    rss: list[tuple[float, int]] = []
    while time.monotonic() - t0 < duration:
        rss.append((time.monotonic() - t0, rss_of(pid)))
        time.sleep(min(window / 4, 2.0))
    stop.set()
    for t in threads:
        t.join(timeout=180)
    rss.append((time.monotonic() - t0, rss_of(pid)))
    alive = sum(t.is_alive() for t in threads)
    return summarise(stats.events, rss, duration, window, clients, alive)


def summarise(events: list[tuple[float, str, str, float]], rss: list[tuple[float, int]], duration: float,
              window: float, clients: int, stuck_clients: int) -> dict[str, Any]:
    outcomes = Counter(o for _, _, o, _ in events)
    by_kind: dict[str, Counter] = defaultdict(Counter)
    for _, k, o, _ in events:
        by_kind[k][o] += 1
    windows = []
    for w0 in np.arange(0, duration, window):
        lat = [lt for t, _, o, lt in events if w0 <= t < w0 + window and o == "ok"]
        windows.append({"start_s": float(w0), "requests": len(lat),
                        "p50_s": float(np.percentile(lat, 50)) if lat else None,
                        "p99_s": float(np.percentile(lat, 99)) if lat else None})
    warm = [b for t, b in rss if t >= min(duration * 0.2, 60.0)] or [b for _, b in rss]
    five_xx = sum(n for o, n in outcomes.items() if o.startswith("http5"))
    lost = sum(n for o, n in outcomes.items() if o.startswith("lost") or o == "stream-unfinished") + stuck_clients
    return {"clients": clients, "duration_s": duration, "requests": len(events), "outcomes": dict(outcomes),
            "by_kind": {k: dict(v) for k, v in by_kind.items()}, "5xx": five_xx, "lost": lost,
            "rss_mb": [(round(t, 1), round(b / 2**20, 1)) for t, b in rss],
            "rss_growth_after_warmup_mb": round((warm[-1] - warm[0]) / 2**20, 1),
            "windows": windows}


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    t, mb = zip(*result["rss_mb"])
    a.plot(np.array(t) / 60, mb)
    a.set_ylabel("server RSS (MiB)")
    a.set_title(f"soak: {result['clients']} clients, {result['requests']} requests, "
                f"{result['5xx']} 5xx, {result['lost']} lost")
    w = [x for x in result["windows"] if x["p99_s"] is not None]
    b.plot([x["start_s"] / 60 for x in w], [x["p99_s"] for x in w], marker="o", label="p99")
    b.plot([x["start_s"] / 60 for x in w], [x["p50_s"] for x in w], marker=".", label="p50")
    b.set_ylabel("latency of answered requests (s)")
    b.set_xlabel("minutes")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="GGUF model (default: the embedded Gemma 3 270M)")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds")
    ap.add_argument("--window", type=float, default=None, help="seconds per latency window (default: duration/20)")
    ap.add_argument("--n-parallel", type=int, default=4)
    ap.add_argument("--max-waiting", type=int, default=8, help="the server's queue; more clients than this overload it")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS / "soak_server"), help="path stem of the .json and .png")
    args = ap.parse_args(argv)
    import slot_cpp

    model = args.model or slot_cpp.default_model_path()
    window = args.window or max(args.duration / 20, 5.0)
    with tempfile.TemporaryDirectory() as tmp:
        store, head = prepare(str(model), Path(tmp))
        proc, url = start_server(str(model), store, head, n_parallel=args.n_parallel, max_waiting=args.max_waiting,
                                 threads=args.threads)
        try:
            result = soak(url, proc.pid, args.clients, args.duration, window)
            # Afterwards the server still answers a known request.
            r = httpx.post(url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 4,
                                                          "temperature": 0}, timeout=60)
            result["after"] = {"status": r.status_code, "text": r.json()["choices"][0]["text"]
                               if r.status_code == 200 else None}
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
        result["server_exit"] = proc.returncode
    result["command"] = " ".join(["python", "benchmarks/soak_server.py"] + (argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(json.dumps({k: result[k] for k in ("requests", "outcomes", "5xx", "lost", "rss_growth_after_warmup_mb",
                                             "after")}, indent=1))
    return 1 if result["5xx"] or result["lost"] or result["after"]["status"] != 200 else 0


if __name__ == "__main__":
    sys.exit(main())
