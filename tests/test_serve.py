"""cqil-serve on loopback, talked to with the official `openai` client: completions and chat, streamed
and not, stop, n, logprobs, max_tokens; greedy answers equal `engine.complete` / `engine.chat`;
concurrent requests decoded together and each equal to its answer alone; a client that disconnects
frees its row; limits (429) and bad requests (400 with OpenAI's error JSON); the `cqil-serve` command
itself; and a brief run of tools/bench_serve.py's load test."""

from __future__ import annotations

import gc
import http.client
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import openai
import pytest

import cqil
from cqil.serve.batcher import Ticket
from cqil.serve.server import Server
from engine_util import compile_engine

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "small-llama"
CHAT = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A function, please."}]


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    out = compile_engine(FIXTURE, tmp_path_factory.mktemp("serve") / "small-llama", p=2, start=2, end=10, bypass=1,
                         dtype="float32", max_seq_len=128)
    with cqil.load(out, threads=1) as e:
        yield e


@pytest.fixture(scope="module")
def server(engine):
    with Server(engine, port=0, max_batch=8, max_queue=16).start() as s:
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def health(server) -> dict:
    return json.loads(raw(server, "GET", "/health")[1])


def raw(server, method, path, body: bytes | None = None, headers=None):
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request(method, path, body=body, headers=headers or {"Content-Type": "application/json"})
    r = conn.getresponse()
    return r.status, r.read()


def test_completion_streamed_and_not_equals_engine_complete(engine, client):
    for prompt, n in (("def main(", 24), ("import os\nimport sys\n", 12)):
        expected = engine.complete(prompt, temperature=0, max_tokens=n)
        r = client.completions.create(model="small-llama", prompt=prompt, max_tokens=n, temperature=0)
        assert r.object == "text_completion" and r.choices[0].text == expected
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == n
        assert r.usage.prompt_tokens == len(engine.tokenizer(prompt)["input_ids"])
        chunks = list(client.completions.create(model="small-llama", prompt=prompt, max_tokens=n, temperature=0,
                                                stream=True))
        assert "".join(c.choices[0].text for c in chunks) == expected
        assert [c.choices[0].finish_reason for c in chunks][-1] == "length"
        assert all(c.id == chunks[0].id for c in chunks)


def test_chat_streamed_and_not_equals_engine_chat(engine, client):
    expected = engine.chat(CHAT, temperature=0, max_tokens=20)
    r = client.chat.completions.create(model="small-llama", messages=CHAT, max_tokens=20, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    chunks = list(client.chat.completions.create(model="small-llama", messages=CHAT, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_stop_n_logprobs_max_tokens(engine, client):
    full = engine.complete("def main(", temperature=0, max_tokens=30)
    stop = next(s for s in ("\n", ":", " ") if s in full[1:])
    r = client.completions.create(model="small-llama", prompt="def main(", max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.index(stop, 1)] and r.choices[0].finish_reason == "stop"
    # n=2, sampled with a seed: choice i is what engine.complete gives for the same seed (seed + i per choice)
    r = client.completions.create(model="small-llama", prompt="def main(", max_tokens=10, n=2, seed=7,
                                  temperature=1.0)
    assert [c.text for c in r.choices] == engine.complete("def main(", max_tokens=10, n=2, seed=7, temperature=1.0)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 20
    # logprobs: the raw model's log_softmax, checked on the engine's own logits
    r = client.completions.create(model="small-llama", prompt="def main(", max_tokens=3, temperature=0, logprobs=2)
    lp = r.choices[0].logprobs
    ids = engine.tokenizer("def main(")["input_ids"]
    x = engine.logits([ids])[0, -1].astype(np.float64)
    ref = x - np.log(np.exp(x - x.max()).sum()) - x.max()
    assert lp.token_logprobs[0] == pytest.approx(ref.max(), abs=1e-4) and len(lp.tokens) == 3
    assert sorted(lp.top_logprobs[0].values(), reverse=True) == pytest.approx(np.sort(ref)[::-1][:2], abs=1e-4)
    assert lp.text_offset[0] == 0 and "".join(lp.tokens) == r.choices[0].text
    r = client.chat.completions.create(model="small-llama", messages=CHAT, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 3 and len(content[0].top_logprobs) == 3
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy: the best one
    r = client.completions.create(model="small-llama", prompt="x", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"


def test_bad_requests_get_openai_errors(client, server):
    def error_of(call):
        with pytest.raises(openai.BadRequestError) as e:
            call()
        assert e.value.status_code == 400
        return e.value.body

    body = error_of(lambda: client.completions.create(model="gpt-4", prompt="x"))
    assert body["type"] == "invalid_request_error" and body["param"] == "model" and "gpt-4" in body["message"]
    body = error_of(lambda: client.completions.create(model="small-llama", prompt="x", max_tokens=-3))
    assert body["param"] == "max_tokens" and "max_tokens must be >= 1" in body["message"]
    body = error_of(lambda: client.completions.create(model="small-llama", prompt="def f():\n" * 100))
    assert "max_seq_len" in body["message"]
    body = error_of(lambda: client.completions.create(model="small-llama", prompt="x", max_tokens=500))
    assert "max_seq_len is 128" in body["message"]
    body = error_of(lambda: client.completions.create(model="small-llama", prompt="x", n=9))
    assert "--max-batch" in body["message"]
    error_of(lambda: client.completions.create(model="small-llama", prompt="x", temperature=-1))
    error_of(lambda: client.completions.create(model="small-llama", prompt="x", echo=True))
    error_of(lambda: client.chat.completions.create(model="small-llama", messages=[{"role": "robot", "content": ""}]))
    for payload in (b"{not json", b"[1, 2]", b'{"prompt": [1, 99999]}', b'{"prompt": "x", "stop": [""]}'):
        status, data = raw(server, "POST", "/v1/completions", payload)
        assert status == 400 and set(json.loads(data)["error"]) == {"message", "type", "param", "code"}, data
    status, data = raw(server, "POST", "/v1/completions", b'{"prompt": "' + b"x" * (33 * 2**20) + b'"}')
    assert status == 413 and "exceeds 32 MiB" in json.loads(data)["error"]["message"]
    status, data = raw(server, "GET", "/v1/nothing")
    assert status == 404 and "error" in json.loads(data)
    assert [m.id for m in client.models.list().data] == ["small-llama"]
    assert health(server)["status"] == "ok"


def test_concurrent_requests_are_batched_and_each_equals_its_answer_alone(engine, client, server):
    prompts = ["def main(", "import os\n", "class A:\n    def", "for i in range(", "x = [", "return self."]
    alone = [engine.complete(p, temperature=0, max_tokens=16 + 4 * i) for i, p in enumerate(prompts)]
    got, steps = {}, health(server)["steps"]

    def ask(i):
        kw = dict(model="small-llama", prompt=prompts[i], max_tokens=16 + 4 * i, temperature=0)
        if i % 2:
            got[i] = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw))
        else:
            got[i] = client.completions.create(**kw).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(len(prompts))] == alone
    after = health(server)
    assert after["peak_rows"] > 1  # decoded together
    assert after["steps"] - steps < sum(16 + 4 * i for i in range(len(prompts)))  # fewer steps than one by one
    assert after["running"] == 0 and after["waiting"] == 0


def test_a_failing_step_fails_its_request_and_the_server_goes_on(engine, client, server, monkeypatch):
    forward, calls = engine.forward, []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected failure")
        return forward(*args)

    monkeypatch.setattr(engine, "forward", fails_once)
    with pytest.raises(openai.InternalServerError) as e:
        client.completions.create(model="small-llama", prompt="def main(", max_tokens=10, temperature=0)
    assert e.value.status_code == 500 and "injected failure" in e.value.body["message"]
    assert health(server)["status"] == "unavailable"  # until a step succeeds again
    r = client.completions.create(model="small-llama", prompt="def main(", max_tokens=10, temperature=0)
    assert r.choices[0].text == engine.complete("def main(", temperature=0, max_tokens=10)
    assert health(server)["status"] == "ok"


def wait_for(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_disconnects_frees_its_row(server, stream):
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": "small-llama", "prompt": "def main(", "max_tokens": 100, "temperature": 0, "stream": stream,
            "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    if stream:
        r = conn.getresponse()
        r.fp.readline()  # the first event: it runs
    else:
        wait_for(lambda: health(server)["running"] == 1)
    steps = health(server)["steps"]
    conn.sock.close()
    conn.close()
    wait_for(lambda: health(server)["running"] == 0)
    assert health(server)["steps"] - steps < 90  # it left long before its 100 tokens


def test_full_queue_answers_429(engine):
    with Server(engine, port=0, max_batch=1, max_queue=1).start() as small:
        client = openai.OpenAI(base_url=small.url + "/v1", api_key="-", max_retries=0, timeout=60)
        kw = dict(model="small-llama", prompt="def main(", max_tokens=60, temperature=0, extra_body={"ignore_eos": True})
        first = client.completions.create(stream=True, **kw)  # takes the one row
        next(iter(first))
        second = threading.Thread(target=lambda: client.completions.create(**kw))
        second.start()  # waits in the queue
        wait_for(lambda: health(small)["waiting"] == 1)
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(**kw)
        assert e.value.status_code == 429 and e.value.body["code"] == "queue_full"
        first.close()
        second.join()
        gc.collect()
        with warnings.catch_warnings():  # isinstance on every live object wakes deprecated module attributes
            warnings.simplefilter("ignore")
            left = [o for o in gc.get_objects() if isinstance(o, Ticket)]
        assert not left  # nothing of the requests is kept


def test_cqil_serve_command(engine):
    """The console script: the port it chose is in its log line; SIGTERM ends it (143, like every command)."""
    proc = subprocess.Popen([sys.executable, "-c", "from cqil.serve.cli import serve_entry; serve_entry()",
                             str(engine.dir), "--port", "0", "--threads", "1", "--no-verify"],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "CQIL_DEBUG": ""})
    try:
        line = proc.stderr.readline()
        m = re.match(r"serving small-llama on (http://127\.0\.0\.1:\d+)/v1 \(max batch 32", line)
        assert m, line
        client = openai.OpenAI(base_url=m.group(1) + "/v1", api_key="-", max_retries=0)
        assert client.completions.create(model="small-llama", prompt="def main(", max_tokens=8,
                                         temperature=0).choices[0].text == engine.complete("def main(", temperature=0,
                                                                                           max_tokens=8)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 143
    finally:
        proc.kill()
    bad = subprocess.run([sys.executable, "-c", "from cqil.serve.cli import serve_entry; serve_entry()",
                          str(engine.dir), "--max-batch", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr == "cqil-serve: error: --max-batch must be >= 1, got 0\n"


def test_load_tool_briefly(server):
    spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "tools" / "bench_serve.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    requests = bench.make_requests(16)
    reference = bench.run_load(server.url, "small-llama", requests, 1)
    loaded = bench.run_load(server.url, "small-llama", requests, 8)
    for r in (reference, loaded):
        assert not r["errors"] and r["answered_once"] and r["server_answered"] == 16
    assert loaded["texts"] == reference["texts"] and loaded["mean_batch"] > 2
    assert health(server)["status"] == "ok"
