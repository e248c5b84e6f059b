"""Text and chat: `engine.complete` and `engine.chat` against the token-level Generator, stop strings
and incremental detokenization, the engine's own chat template (and the fallback), a conversation
that keeps its KV cache between turns (same tokens as a fresh run over the whole conversation), and
`cqil-run --chat`."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

import cqil
from cqil.errors import CqilError
from cqil.runtime.chat import FALLBACK_TEMPLATE, render
from cqil.runtime.cli import run_cli
from cqil.runtime.detokenize import TextDecoder
from cqil.testing import random_checkpoint
from engine_util import STD, TOKENIZER_VOCAB, assert_one_line_error, cli, compile_engine, write_tokenizer

FIXTURE = Path(__file__).parent / "fixtures" / "small-llama"
TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% if m['role'] == 'assistant' %}"
            "{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """The trained fixture in float32, p=2 with bypass: its tokenizer has no chat template."""
    out = compile_engine(FIXTURE, tmp_path_factory.mktemp("chat") / "fixture", p=2, start=2, end=10, bypass=1,
                         dtype="float32", max_seq_len=160)
    with cqil.load(out, threads=1) as e:
        yield e


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """A tiny engine whose checkpoint brings chat_template.jinja (copied into the engine by the compile)."""
    root = tmp_path_factory.mktemp("chat-template")
    ckpt = write_tokenizer(random_checkpoint(root / "ckpt", "llama", init_std=STD, num_hidden_layers=2,
                                             vocab_size=TOKENIZER_VOCAB))
    (ckpt / "chat_template.jinja").write_text(TEMPLATE)
    with cqil.load(compile_engine(ckpt, root / "engine", p=1, max_seq_len=96), threads=1) as e:
        yield e


def greedy_new(engine, ids, n):
    return engine.generate([ids], max_new_tokens=n, eos_token_id=engine.tokenizer.eos_token_id)[0][len(ids):]


def test_complete_equals_the_generator(engine):
    tok = engine.tokenizer
    for prompt in ("def main(", "import os\n"):
        new = greedy_new(engine, tok(prompt)["input_ids"], 24)
        assert engine.complete(prompt, temperature=0, max_tokens=24) == tok.decode(new, skip_special_tokens=True)
    both = engine.complete(["def main(", "import os\n"], temperature=0, max_tokens=24)
    assert both == [engine.complete(p, temperature=0, max_tokens=24) for p in ("def main(", "import os\n")]
    assert len(engine.complete("x = ", temperature=0, n=2)) == 2  # n > 1: a list; max_tokens defaults to 16


def test_stop_strings_cut_before_the_first(engine):
    full = engine.complete("def main(", temperature=0, max_tokens=40)
    stop = next(s for s in ("\n", ":", " ") if s in full[1:])
    at = full.index(stop, 1)
    cut = engine.complete("def main(", temperature=0, max_tokens=40, stop=[stop, "never appears"])
    assert cut == full[:at] and stop not in cut[1:]


def test_decoder_holds_back_possible_stop_strings_and_split_characters(engine):
    tok = engine.tokenizer
    ids = tok.encode("fox € dog and cat", add_special_tokens=False)
    decoder, chunks = TextDecoder(tok, stop=["dog and", "d!"]), []
    for t in ids:
        chunks.append(decoder.push(t))
        if decoder.stopped:
            break
    assert "".join(chunks) == decoder.text == "fox € " and decoder.stopped == "dog and"
    assert not any("\ufffd" in c for c in chunks)
    plain = TextDecoder(tok)
    text = "".join(plain.push(t) for t in ids) + plain.finish()
    assert text == tok.decode(ids)


def test_chat_uses_the_engines_template(templated):
    tok = templated.tokenizer
    assert tok.chat_template == TEMPLATE
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick fox"}]
    ids = render(tok, messages)
    assert ids == tok("[system] be brief\n[user] the quick fox\n[assistant]", add_special_tokens=False)["input_ids"]
    reply = templated.chat(messages, temperature=0, max_tokens=12)
    assert reply == tok.decode(greedy_new(templated, ids, 12), skip_special_tokens=True)


def test_fallback_template_with_one_warning(engine, caplog):
    from cqil.runtime import chat as chat_module

    chat_module._warned.clear()
    with caplog.at_level(logging.WARNING, logger="cqil"):
        render(engine.tokenizer, [{"role": "user", "content": "hi"}])
        render(engine.tokenizer, [{"role": "user", "content": "hi"}])
    assert [r.message for r in caplog.records].count(
        "the tokenizer has no chat template; using cqil's fallback (Zephyr's layout)") == 1
    text = engine.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                add_generation_prompt=True, chat_template=FALLBACK_TEMPLATE)
    assert text == "<s><|user|>\nhi</s>\n<|assistant|>\n"


def test_second_turn_reuses_the_cache_and_equals_a_fresh_run(engine, monkeypatch):
    fed = []
    forward = engine.forward
    monkeypatch.setattr(engine, "forward", lambda ids, *a: (fed.append(ids.shape[1]), forward(ids, *a))[1])
    chat = engine.start_chat(system="You write Python.", temperature=0, max_tokens=20)
    first = chat.send("Write a function.")
    prefill = fed[0]
    fed.clear()
    second = chat.send("Now a class.")
    history = chat.messages[:-1]
    full = len(render(engine.tokenizer, history))
    assert fed[0] == chat.fed < full - prefill  # only the new turn's tokens went in, not the history
    monkeypatch.setattr(engine, "forward", forward)
    assert second == engine.chat(history, temperature=0, max_tokens=20)  # a fresh run over all of it
    assert first == engine.chat(history[:2], temperature=0, max_tokens=20)


def test_bad_messages(engine):
    for messages, words in (([], "messages is empty"), ("hi", "must be a list"),
                            ([{"role": "robot", "content": "x"}], "role must be one of"),
                            ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts"),
                            ([{"role": "user"}], "content must be a string")):
        with pytest.raises(CqilError, match=words):
            engine.chat(messages)
    with pytest.raises(CqilError, match="unknown sampling parameter"):
        engine.complete("x", temprature=0)


def test_cqil_run_chat_keeps_the_conversation(engine, monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("Write a function.\n\nNow a class.\n/exit\nnot read\n"))
    code, out, err = cli("cqil-run", run_cli, [engine.dir, "--chat", "--system", "You write Python.",
                                               "--max-new-tokens", "20", "--threads", "1"], capsys)
    assert code == 0, err
    chat = engine.start_chat(system="You write Python.", temperature=0, max_tokens=20)
    expected = [chat.send("Write a function."), chat.send("Now a class.")]
    assert out == "".join(f"{r}\n" for r in expected)
    assert_one_line_error(*cli("cqil-run", run_cli, [engine.dir, "--chat", "--json"], capsys)[::2],
                          "--json does not go with --chat")
    assert_one_line_error(*cli("cqil-run", run_cli, [engine.dir], capsys)[::2], "--prompt", "--chat")


def test_cqil_run_stop_and_json(engine, capsys):
    full = engine.complete("def main(", temperature=0, max_tokens=30)
    stop = next(s for s in ("\n", ":", " ") if s in full[1:])
    code, out, err = cli("cqil-run", run_cli, [engine.dir, "--prompt", "def main(", "--max-new-tokens", "30",
                                               "--stop", stop, "--json", "--threads", "1"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["text"] == full[:full.index(stop, 1)] and result["stopped"] == "stop"
    code, out, err = cli("cqil-run", run_cli, [engine.dir, "--prompt", "def main(", "--max-new-tokens", "30",
                                               "--quiet", "--threads", "1"], capsys)
    assert code == 0 and out == full + "\n" and err == ""
