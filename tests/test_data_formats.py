"""--data formats (cqil.quality.data): the same tokens give the same numbers whatever file holds them.

The trained fixture model (tests/fixtures/small-llama, with a LLaMA-style tokenizer that has BOS and
EOS) is measured by cqil-eval on one stretch of its held-out text written as plain text, JSONL text,
JSONL / parquet token ids, .npy, nanoGPT .bin (uint16 and uint32), a directory and a glob.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cqil.cli_util import run_main
from cqil.errors import CqilError
from cqil.quality import cli
from cqil.quality.data import load_tokens

MODEL = Path(__file__).parent / "fixtures" / "small-llama"
FLAGS = ["--json", "--seq-len", "64", "--max-tokens", "300"]


def cli_run(main, argv, capsys):
    rc = run_main("cqil-x", main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """(folder, text, ids): the first 1500 characters of heldout.txt and their ids (BOS first)."""
    import transformers

    folder = tmp_path_factory.mktemp("formats")
    text = (MODEL / "heldout.txt").read_text()[:1500]
    ids = transformers.AutoTokenizer.from_pretrained(MODEL)(text)["input_ids"]
    assert ids[0] == 0 and len(ids) > 300
    return folder, text, ids


def write_formats(folder: Path, text: str, ids: list[int]) -> dict[str, tuple[Path, list[str]]]:
    """name -> (path, extra flags), every one holding `text` or exactly `ids`."""
    import pandas as pd

    out = {}
    (folder / "plain.txt").write_text(text)
    out["text"] = (folder / "plain.txt", [])
    (folder / "doc.jsonl").write_text(json.dumps({"text": text, "meta": 1}) + "\n")
    out["jsonl text"] = (folder / "doc.jsonl", [])
    rows = [ids[:100], ids[100:250], ids[250:]]
    (folder / "ids.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    out["jsonl input_ids"] = (folder / "ids.jsonl", [])
    pd.DataFrame({"input_ids": rows}).to_parquet(folder / "ids.parquet")
    out["parquet"] = (folder / "ids.parquet", [])
    np.save(folder / "ids.npy", np.array(ids, dtype=np.int32).reshape(1, -1))  # any integer shape, flattened
    out["npy"] = (folder / "ids.npy", [])
    np.array(ids, dtype=np.uint16).tofile(folder / "ids16.bin")
    out["bin uint16"] = (folder / "ids16.bin", [])
    np.array(ids, dtype=np.uint32).tofile(folder / "ids32.bin")
    out["bin uint32"] = (folder / "ids32.bin", ["--dtype", "uint32"])
    (folder / "docs").mkdir()
    (folder / "docs" / "a.txt").write_text(text)
    out["directory"] = (folder / "docs", [])
    for i, r in enumerate(rows):
        (folder / f"part{i}.jsonl").write_text(json.dumps({"input_ids": r}) + "\n")
    out["glob"] = (folder / "part*.jsonl", [])
    return out


FORMATS = ["jsonl text", "jsonl input_ids", "parquet", "npy", "bin uint16", "bin uint32", "directory", "glob"]


@pytest.fixture(scope="module")
def files(corpus):
    folder, text, ids = corpus
    return write_formats(folder, text, ids)


@pytest.fixture(scope="module")
def from_text(files):
    import io
    import contextlib

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert run_main("cqil-eval", cli.eval_main, [str(MODEL), "--data", str(files["text"][0]), *FLAGS]) == 0
    return json.loads(buf.getvalue())


@pytest.mark.parametrize("name", FORMATS)
def test_same_perplexity_for_the_same_tokens(files, from_text, name, capsys):
    path, extra = files[name]
    rc, out, err = cli_run(cli.eval_main, [MODEL, "--data", path, *extra, *FLAGS], capsys)
    assert rc == 0, err
    result = json.loads(out)
    assert result["tokens"] == from_text["tokens"] == 299
    assert result["perplexity"] == from_text["perplexity"]


def test_loaded_ids_equal(files, corpus):
    _, _, ids = corpus
    for name in ["text", *FORMATS]:
        path, extra = files[name]
        got = load_tokens(path, MODEL, dtype=extra[1] if extra else None, vocab_size=4096)
        assert got.ndim == 1 and got.tolist() == ids, name
    assert load_tokens(files["bin uint16"][0], max_tokens=10).tolist() == ids[:10]
    assert isinstance(load_tokens(files["bin uint16"][0]), np.memmap)  # a corpus is never read into memory


def test_documents_are_joined_with_eos(tmp_path):
    """Each row's text is one document: tokenized alone (BOS first), EOS between documents."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    docs = ["def f(x):\n    return x\n", "", "import os\n", "class A:\n    pass\n"]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    want = tok(docs[0])["input_ids"] + [tok.eos_token_id] + tok(docs[2])["input_ids"] + \
        [tok.eos_token_id] + tok(docs[3])["input_ids"]
    assert load_tokens(tmp_path / "docs.jsonl", MODEL).tolist() == want


def test_analyze_reads_token_ids(files, capsys):
    flags = ["--json", "--seq-len", "64", "--max-tokens", "256", "--p", "2", "--device", "cpu"]
    results = []
    for name in ("text", "bin uint16"):
        rc, out, err = cli_run(cli.analyze_main, [MODEL, "--data", files[name][0], *flags], capsys)
        assert rc == 0, err
        results.append(json.loads(out))
    assert results[0]["tokens"] == 256 and results[0]["adjacent"] == results[1]["adjacent"]


@pytest.mark.parametrize("name, content, extra, message", [
    ("odd.bin", b"\x01\x02\x03", [], "not a whole number of uint16"),
    ("floats.npy", np.zeros(10, np.float32), [], "must be integers"),
    ("big.npy", np.array([1, 2, 5000], np.int64), [], "outside the model's vocabulary of 4096"),
    ("neg.npy", np.array([1, -2, 5], np.int64), [], "is negative"),
    ("fields.jsonl", b'{"content": "x"}\n', [], "no `input_ids` or `text` field (they have content)"),
    ("broken.jsonl", b'{"text": "x"\n', [], "cannot read"),
    ("plain.txt", b"some text", ["--dtype", "uint16"], "applies to .bin token files only"),
    ("none-*.jsonl", None, [], "matches no data files"),
    ("missing.bin", None, [], "does not exist"),
])
def test_bad_data_is_one_line(tmp_path, capsys, name, content, extra, message):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.save(path, content)
    rc, _, err = cli_run(cli.eval_main, [MODEL, "--data", path, *extra, "--seq-len", "16"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    assert message in err and "error: data:" in err


def test_bin_dtype_must_hold_the_vocabulary(tmp_path):
    np.arange(10, dtype=np.uint32).tofile(tmp_path / "ids.bin")
    with pytest.raises(CqilError, match="uint16 cannot hold the ids of a vocabulary of 128256"):
        load_tokens(tmp_path / "ids.bin", dtype="uint16", vocab_size=128256)
    assert load_tokens(tmp_path / "ids.bin", vocab_size=128256).tolist() == list(range(10))  # default: uint32


def test_mixed_directory_is_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "b.parquet").write_bytes(b"PAR1")
    with pytest.raises(CqilError, match="mixes file kinds"):
        load_tokens(tmp_path, MODEL)
