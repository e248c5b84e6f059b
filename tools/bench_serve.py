"""Load test of cqil-serve: concurrent OpenAI clients against one server, checked and timed.

    python tools/bench_serve.py [--engine DIR | --model DIR] [--clients 1,8,32] [--requests 4] [--json FILE]

Starts `cqil-serve` on the engine (by default: the small-llama fixture compiled in float32 with
p=2, range [2, 10), bypass 1, into a temporary folder) on a free loopback port, and for each client
count C runs C threads of the official `openai` client, each sending --requests requests one after
the other: mixed prompt lengths and max_tokens (greedy, ignore_eos, so every answer has exactly its
max_tokens), streaming on for every other request. It checks that

- every request is answered exactly once (each client gets one answer per request, and the
  server's answered counter grows by the number of requests),
- every greedy answer equals the answer of the same request sent alone (the 1-client run),
- the server is alive afterwards (/health), and its resident memory after the last run is within
  --max-growth-mb of what it was after a warm-up run at the largest client count (ONNX Runtime's
  arena and malloc keep what the largest batch shapes needed: that is a high-water mark, not growth);

and reports requests/s, tokens/s and p50/p99 latency per client count, beside sequential
`Engine.generate` of the same requests in this process (run while the server idles). The server's
stderr goes to a log file whose path is printed on failure.

`run_load(url, model, requests, clients)` is what tests/test_serve.py runs briefly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "small-llama"
SEEDS = ["def main(", "import os\n", "class Parser:\n    def __init__(self", "for i in range(",
         "# Copyright 2024\n\"\"\"Utilities for", "return self.", "if __name__ == '__main__':\n    ",
         "with open(path) as f:\n    for line in f:\n        "]


def make_requests(n: int) -> list[dict]:
    """n requests of mixed prompt lengths, answer lengths and streaming, the same for every run."""
    out = []
    for i in range(n):
        prompt = SEEDS[i % len(SEEDS)] * (1 + (i // len(SEEDS)) % 3)
        out.append({"prompt": prompt, "max_tokens": (8, 24, 48, 16)[i % 4], "stream": i % 2 == 1})
    return out


def ask(client, model: str, req: dict) -> tuple[str, int]:
    """(text, completion tokens) of one greedy request."""
    common = dict(model=model, prompt=req["prompt"], max_tokens=req["max_tokens"], temperature=0,
                  extra_body={"ignore_eos": True})
    if not req["stream"]:
        r = client.completions.create(**common)
        return r.choices[0].text, r.usage.completion_tokens
    text, tokens = [], 0
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **common):
        if chunk.choices:
            text.append(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return "".join(text), tokens


def health(url: str) -> dict:
    with urllib.request.urlopen(url + "/health", timeout=30) as r:
        return json.loads(r.read())


def run_load(url: str, model: str, requests: list[dict], clients: int) -> dict:
    """`clients` threads share `requests` in equal blocks (each block mixes lengths and streaming), each
    client sending its block one request at a time."""
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    answers: dict[int, list] = {i: [] for i in range(len(requests))}
    latencies, errors = [], []
    before = health(url)

    per = -(-len(requests) // clients)

    def work(c: int):
        for i in range(c * per, min((c + 1) * per, len(requests))):
            t0 = time.perf_counter()
            try:
                answers[i].append(ask(client, model, requests[i]))
            except Exception as e:  # counted, reported
                errors.append(f"request {i}: {type(e).__name__}: {e}")
            latencies.append(time.perf_counter() - t0)

    threads = [threading.Thread(target=work, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = health(url)
    tokens = sum(a[1] for got in answers.values() for a in got)
    lat = sorted(latencies)
    return {"clients": clients, "requests": len(requests), "wall_s": wall, "errors": errors,
            "answered_once": all(len(a) == 1 for a in answers.values()),
            "server_answered": after["answered"] - before["answered"],
            "mean_batch": (after["tokens"] - before["tokens"]) / max(after["steps"] - before["steps"], 1),
            "texts": {i: a[0][0] for i, a in answers.items() if a}, "tokens": tokens,
            "requests_per_s": len(requests) / wall, "tokens_per_s": tokens / wall,
            "p50_s": lat[len(lat) // 2] if lat else None, "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None}


def sequential_generate(engine_dir: Path, requests: list[dict], threads: int | None) -> dict:
    """The same requests through Engine.generate, one at a time, in this process."""
    import cqil

    with cqil.load(engine_dir, threads=threads) as engine:
        tok = engine.tokenizer
        engine.generate([tok(requests[0]["prompt"])["input_ids"]], max_new_tokens=4)  # warm-up
        t0, lat, tokens = time.perf_counter(), [], 0
        for req in requests:
            t1 = time.perf_counter()
            ids = tok(req["prompt"])["input_ids"]
            out = engine.generate([ids], max_new_tokens=req["max_tokens"])
            tok.decode(out[0][len(ids):], skip_special_tokens=True)
            tokens += len(out[0]) - len(ids)
            lat.append(time.perf_counter() - t1)
        wall = time.perf_counter() - t0
    lat.sort()
    return {"requests_per_s": len(requests) / wall, "tokens_per_s": tokens / wall, "p50_s": lat[len(lat) // 2],
            "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def start_server(engine_dir: Path, threads: int | None, max_batch: int, log_path: Path):
    cmd = [sys.executable, "-c", "from cqil.serve.cli import serve_entry; serve_entry()", str(engine_dir),
           "--port", "0", "--max-batch", str(max_batch), "--max-queue", "1024"]
    if threads:
        cmd += ["--threads", str(threads)]
    log = open(log_path, "w+")
    proc = subprocess.Popen(cmd, stderr=log, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        text = log_path.read_text()
        m = re.search(r"serving (\S+) on (http://\S+)/v1", text)
        if m:
            return proc, m.group(2), m.group(1)
        if proc.poll() is not None:
            raise SystemExit(f"cqil-serve exited {proc.returncode}: {text}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"cqil-serve did not start: see {log_path}")


def rss_mb(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", help="engine directory (default: compile the fixture)")
    ap.add_argument("--model", default=str(FIXTURE), help="checkpoint to compile when --engine is not given")
    ap.add_argument("--clients", default="1,8,32")
    ap.add_argument("--requests", type=int, default=4, help="requests per client (default 4)")
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--threads", type=int, help="the server's (and generate's) intra-op threads")
    ap.add_argument("--max-growth-mb", type=float, default=64.0)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="cqil-bench-serve-"))
    engine_dir = Path(args.engine) if args.engine else None
    if engine_dir is None:
        import cqil

        engine_dir = cqil.compile(args.model, tmp / "engine", p=2, start=2, end=10, bypass=1, dtype="float32",
                                  max_seq_len=256, progress=False, log=lambda m: None)
    biggest = make_requests(max(clients) * args.requests)
    log_path = tmp / "server.log"
    proc, url, model = start_server(engine_dir, args.threads, args.max_batch, log_path)
    results, failures = {"runs": []}, []
    try:
        # warm-up at full concurrency: ONNX Runtime's arena and the allocator grow to the largest shapes once
        run_load(url, model, biggest, max(clients))
        rss_start = rss_mb(proc.pid)
        reference = run_load(url, model, biggest, 1)  # every request alone: the expected answers
        results["runs"].append(reference)
        for c in clients:
            if c == 1:
                continue
            r = run_load(url, model, make_requests(c * args.requests), c)
            results["runs"].append(r)
            wrong = [i for i, t in r["texts"].items() if t != reference["texts"][i]]
            if wrong:
                failures.append(f"{c} clients: {len(wrong)} answers differ from the sequential ones (e.g. {wrong[:3]})")
        rss_end = rss_mb(proc.pid)
        results["rss_mb"] = {"after_warm_up": rss_start, "after_last_run": rss_end}
        if rss_end - rss_start > args.max_growth_mb:
            failures.append(f"server memory grew {rss_end - rss_start:.0f} MiB (> {args.max_growth_mb:g})")
        for r in results["runs"]:
            if r["errors"] or not r["answered_once"] or r["server_answered"] != r["requests"]:
                failures.append(f"{r['clients']} clients: errors {r['errors'][:3]}, answered once: {r['answered_once']}, "
                                f"server answered {r['server_answered']} of {r['requests']}")
        if health(url)["status"] != "ok":
            failures.append("the server is not healthy afterwards")
        # one client's share of the work, for a like-for-like sequential baseline (the server idles meanwhile)
        results["sequential_generate"] = sequential_generate(engine_dir, biggest[:max(args.requests * 8, 16)],
                                                             args.threads)
    finally:
        proc.terminate()
        proc.wait(30)
    results["machine"] = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()}
    results["command"] = " ".join(["python", "tools/bench_serve.py", *(argv if argv is not None else sys.argv[1:])])
    print(f"{'clients':>7} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7}  mean batch")
    for r in results["runs"]:
        print(f"{r['clients']:>7} {r['requests_per_s']:>7.2f} {r['tokens_per_s']:>8.1f} {r['p50_s']:>7.3f} "
              f"{r['p99_s']:>7.3f}  {r['mean_batch']:.1f}")
    s = results["sequential_generate"]
    print(f"{'generate':>7} {s['requests_per_s']:>7.2f} {s['tokens_per_s']:>8.1f} {s['p50_s']:>7.3f} {s['p99_s']:>7.3f}"
          f"  (sequential, in process)")
    print(f"server RSS: {results['rss_mb']['after_warm_up']:.0f} MiB after the warm-up, "
          f"{results['rss_mb']['after_last_run']:.0f} MiB after the last")
    if args.json:
        for r in results["runs"]:
            r.pop("texts")
        Path(args.json).write_text(json.dumps(results, indent=1))
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures) + f"\n(server log: {log_path})", file=sys.stderr)
        return 1
    print("PASSED: every request answered once, greedy answers equal the sequential ones, server alive")
    return 0


if __name__ == "__main__":
    sys.exit(main())
