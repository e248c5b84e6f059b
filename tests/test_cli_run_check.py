"""cqil-run (streamed text, --json, token ids without a tokenizer) and cqil-check (exit 0 on a good
engine, 1 on a sabotaged one, 2 on bad input).

The checkpoint carries a tiny byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json),
which the compiler copies into the engine directory. Command lines run in process through
`run_main`, exactly as their console scripts do; one test runs the installed `cqil-check`.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

from cqil.runtime.cli import run_cli
from cqil.runtime.textio import TextStream
from cqil.verify import check_cli
from cqil.testing import random_checkpoint
from engine_util import (STD, TOKENIZER_VOCAB, assert_one_line_error, cli, compile_engine, open_engine,
                         write_tokenizer)

PLAN = dict(p=2, start=1, end=5, bypass=1)
LAYERS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = random_checkpoint(tmp_path_factory.mktemp("tok") / "ckpt", "llama", init_std=STD,
                             num_hidden_layers=LAYERS, vocab_size=TOKENIZER_VOCAB)
    return write_tokenizer(folder)


@pytest.fixture(scope="module")
def engine_dir(checkpoint, tmp_path_factory):
    return compile_engine(checkpoint, tmp_path_factory.mktemp("tok-engine") / "engine", **PLAN)


@pytest.fixture(scope="module")
def engine(engine_dir):
    with open_engine(engine_dir) as e:
        yield e


def run(engine_dir, capsys, *argv):
    return cli("cqil-run", run_cli, [engine_dir, "--threads", "1", *argv], capsys)


# -- streaming text -----------------------------------------------------------------------------


def test_stream_keeps_a_character_split_over_tokens_whole(engine):
    tok = engine.tokenizer
    euro = tok.encode("€", add_special_tokens=False)
    assert len(euro) == 3  # one byte per token: the case the streamer must hold back
    ids = tok.encode("fox", add_special_tokens=False) + euro + tok.encode(" dog", add_special_tokens=False)
    chunks = []
    stream = TextStream(tok, chunks.append)
    for i in ids:
        stream.put(i)
    stream.end()
    assert "".join(chunks) == "fox€ dog"
    assert not any("\ufffd" in c for c in chunks)
    assert "€" in chunks  # printed the moment its last byte arrived, not later


def test_run_json(engine_dir, engine, capsys):
    prompt = "the quick brown fox"
    code, out, err = run(engine_dir, capsys, "--prompt", prompt, "--max-new-tokens", "12", "--ignore-eos", "--json")
    assert code == 0, err
    result = json.loads(out)
    prompt_ids = engine.tokenizer(prompt)["input_ids"]
    expected = engine.generate([prompt_ids], max_new_tokens=12)[0][len(prompt_ids):]
    assert result["input_ids"] == prompt_ids
    assert result["output_ids"] == expected and result["new_tokens"] == 12
    assert result["text"] == engine.tokenizer.decode(expected, skip_special_tokens=True)
    assert result["prefill_ms"] > 0 and result["ms_per_token"] > 0
    assert result["stopped"] == "length"


def test_run_streams_the_same_text(engine_dir, engine, capsys):
    """Greedy text mode prints exactly the decoded new tokens (stopping at the tokenizer's eos)."""
    prompt = "seven wizards"
    code, out, err = run(engine_dir, capsys, "--prompt", prompt, "--max-new-tokens", "24")
    assert code == 0, err
    prompt_ids = engine.tokenizer(prompt)["input_ids"]
    new = engine.generate([prompt_ids], max_new_tokens=24, eos_token_id=[2])[0][len(prompt_ids):]
    assert out == engine.tokenizer.decode(new, skip_special_tokens=True) + "\n"
    assert "ms/token" in err and len(err.strip().splitlines()) == 1


def test_run_sampling_is_reproducible(engine_dir, engine, capsys):
    argv = ["--input-ids", "5,6,7", "--max-new-tokens", "10", "--ignore-eos", "--json",
            "--do-sample", "--temperature", "1.5", "--top-k", "50", "--top-p", "0.9", "--seed", "7"]
    first = json.loads(run(engine_dir, capsys, *argv)[1])
    again = json.loads(run(engine_dir, capsys, *argv)[1])
    assert again["output_ids"] == first["output_ids"]
    assert first["output_ids"] == engine.generate([[5, 6, 7]], max_new_tokens=10, do_sample=True, temperature=1.5,
                                                  top_k=50, top_p=0.9, seed=7)[0][3:]
    assert first["output_ids"] != engine.generate([[5, 6, 7]], max_new_tokens=10)[0][3:]  # it did sample


def test_run_temperature_zero_is_greedy(engine_dir, engine, capsys):
    """As in OpenAI's API (and cqil-serve, cqil-run-native): --temperature 0 decodes greedily."""
    argv = ["--input-ids", "5,6,7", "--max-new-tokens", "10", "--ignore-eos", "--json", "--do-sample", "--seed", "7"]
    out = json.loads(run(engine_dir, capsys, *argv, "--temperature", "0")[1])
    assert out["output_ids"] == engine.generate([[5, 6, 7]], max_new_tokens=10)[0][3:]


def test_run_bad_sampling_flags(engine_dir, capsys):
    assert_one_line_error(*run(engine_dir, capsys, "--input-ids", "1", "--temperature", "-1")[::2], "temperature")
    assert_one_line_error(*run(engine_dir, capsys, "--input-ids", "1", "--max-new-tokens", "0")[::2], "max_new_tokens")


@pytest.fixture(scope="module")
def bare_engine_dir(tiny_checkpoint, tmp_path_factory):
    """An engine without tokenizer files (the checkpoint has only generation_config.json)."""
    ckpt = tiny_checkpoint("llama", init_std=STD, num_hidden_layers=2)
    return compile_engine(ckpt, tmp_path_factory.mktemp("bare") / "engine", p=1)


def test_run_token_ids_without_a_tokenizer(bare_engine_dir, capsys):
    code, out, err = run(bare_engine_dir, capsys, "--input-ids", "1, 2, 3", "--max-new-tokens", "5",
                         "--ignore-eos", "--json")
    assert code == 0, err
    result = json.loads(out)
    assert "text" not in result and len(result["output_ids"]) == 5
    code, out, err = run(bare_engine_dir, capsys, "--input-ids", "1,2,3", "--max-new-tokens", "5", "--ignore-eos")
    assert code == 0, err
    assert out.split() == [str(t) for t in result["output_ids"]]  # streamed as ids
    assert_one_line_error(*run(bare_engine_dir, capsys, "--prompt", "hi")[::2], "no tokenizer")


def test_run_stops_at_eos_from_generation_config(bare_engine_dir, capsys):
    """generation_config.json's eos (2 in the tiny checkpoints) ends generation; --ignore-eos does not."""
    code, out, _ = run(bare_engine_dir, capsys, "--input-ids", "1,2,3", "--max-new-tokens", "40", "--json",
                       "--ignore-eos")
    ids = json.loads(out)["output_ids"]
    with open_engine(bare_engine_dir) as e:
        forced = e.generate([[1, 2, 3]], max_new_tokens=40, eos_token_id=[2])[0][3:]
    code, out, _ = run(bare_engine_dir, capsys, "--input-ids", "1,2,3", "--max-new-tokens", "40", "--json")
    result = json.loads(out)
    assert result["output_ids"] == forced
    if 2 in ids:
        assert result["output_ids"] == ids[:ids.index(2) + 1] and result["stopped"] == "eos"
    else:
        assert result["output_ids"] == ids and result["stopped"] == "length"


# -- cqil-check ---------------------------------------------------------------------------------


def test_check_passes_on_a_good_engine(engine_dir, checkpoint, capsys):
    code, out, err = cli("cqil-check", check_cli, [engine_dir, "--model", checkpoint, "--steps", "32",
                                                   "--threads", "1", "--json"], capsys)
    assert code == 0, out + err
    report = json.loads(out)
    assert report["passed"] and report["tokens_agree"]
    assert report["outputs"]["logits"]["max_abs"] <= 1e-4
    assert {f"present.{l}.{k}" for l in range(LAYERS) for k in ("key", "value")} <= set(report["outputs"])
    assert len(report["engine_tokens"][0]) == 32


def test_check_fails_against_other_weights(engine_dir, tmp_path, capsys):
    """Same config, other random weights: the logits differ, the exit status is 1."""
    other = random_checkpoint(tmp_path / "other", "llama", seed=1, init_std=STD, num_hidden_layers=LAYERS,
                            vocab_size=TOKENIZER_VOCAB)
    code, out, err = cli("cqil-check", check_cli, [engine_dir, "--model", other, "--steps", "4", "--threads", "1"],
                         capsys)
    assert code == 1, out + err
    lines = out.strip().splitlines()
    assert lines[-1] == "FAILED"
    assert any(line.startswith("logits") and line.endswith("FAIL") for line in lines)


def test_check_bad_input(engine_dir, checkpoint, tiny_checkpoint, tmp_path, capsys):
    def check(*argv):
        return cli("cqil-check", check_cli, [engine_dir, "--threads", "1", *argv], capsys)[::2]

    wrong = tiny_checkpoint("llama", num_hidden_layers=3)
    capsys.readouterr()  # save_pretrained's progress bar
    assert_one_line_error(*check("--model", wrong), "not the model this engine was compiled from", "num_layers")
    assert_one_line_error(*check("--model", tmp_path / "nowhere"), "not a directory")
    assert_one_line_error(*check("--model", checkpoint, "--steps", "5000"), "max_seq_len")


def test_check_asks_for_the_merged_adapter(engine_dir, checkpoint, tmp_path, capsys):
    """An engine compiled with a LoRA adapter merged: the reference must merge it too."""
    copy = shutil.copytree(engine_dir, tmp_path / "engine")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["source"]["adapter"] = "/somewhere/adapter"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = cli("cqil-check", check_cli, [copy, "--model", checkpoint, "--threads", "1"], capsys)
    assert_one_line_error(code, err, "--adapter /somewhere/adapter", "reference merges it too")


def test_check_entry_exit_status(engine_dir, checkpoint, monkeypatch, capsys):
    """The console script's function, with its argv: exit 0 and a readable report. (The installed
    script is this function; a subprocess would only add seconds of imports.)"""
    import tomllib

    from cqil.verify import check_entry

    scripts = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["cqil-check"] == "cqil.verify:check_entry" and scripts["cqil-run"] == "cqil.runtime.cli:run_entry"
    monkeypatch.setattr(sys, "argv", ["cqil-check", str(engine_dir), "--model", str(checkpoint), "--steps", "8",
                                      "--threads", "1"])
    with pytest.raises(SystemExit) as exit_:
        check_entry()
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out
    assert "greedy tokens: identical for 8 steps" in out and out.strip().endswith("PASSED")
