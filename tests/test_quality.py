"""Quality tools: cqil-analyze, cqil-finetune (LoRA, merge_adapter), cqil-eval (perplexity).

Tiny random LLaMAs (cqil.testing) with a byte-level tokenizer built on the fly; the library tests use
token ids directly. Perplexity is checked against transformers, merging against peft's own
merge_and_unload on transformers' LlamaForCausalLM.
"""

from __future__ import annotations

import json
import math
import random
import sys

import pytest
import torch

import cqil.compiler.cli as compile_cli

from cqil.cli_util import run_main
from cqil.model.loader import load_model
from cqil.passes import build_graph
from cqil.errors import CqilError
from cqil.plan import Plan
from cqil.quality import cli
from cqil.model.adapter import PLAN_FILE, merge_adapter, same_computation
from cqil.quality.train import Settings, distillation_loss, finetune, next_token_loss
from cqil.quality.perplexity import Window, perplexity, sliding_windows
from cqil.quality.similarity import Similarity, suggest_range
from cqil.testing import random_checkpoint

torch.set_num_threads(1)

PLAN = Plan(6, 2, 1, 5, bypass=1)  # the tiny models have 6 layers
WORDS = ("the model layer group rank input output cache token attention bypass range similar "
         "adjacent parallel residual norm weight adapter plan engine").split()


def save_byte_tokenizer(folder):
    """A byte-level tokenizer of exactly 256 ids (the tiny models' vocabulary), saved for AutoTokenizer."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)


def sample_text(n_words=120, seed=0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words)) + "\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = random_checkpoint(tmp_path_factory.mktemp("quality") / "tiny", "llama", init_std=0.1)
    save_byte_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "heldout.txt"
    path.write_text(sample_text())
    return path


@pytest.fixture(scope="module")
def stream():
    return torch.randint(0, 256, (96,), generator=torch.Generator().manual_seed(1))


def cqil_losses(model, ids):
    """(KD loss, next-token loss) of the CQIL graph of PLAN on one window, teacher = the plain model."""
    gm = build_graph(model, PLAN)
    ids = ids[None]
    run = lambda m: m(ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None], model.empty_cache(1))[0]
    with torch.no_grad():
        student = run(gm)
        return distillation_loss(student, run(model)).item(), next_token_loss(student[:, :-1], ids[:, 1:]).item()


@pytest.fixture(scope="module")
def trained(model_dir, stream, tmp_path_factory):
    """One KD and one plain adapter for PLAN, with the losses before and after."""
    out = {}
    for kd in (True, False):
        folder = tmp_path_factory.mktemp("adapters") / f"kd{kd}"
        settings = Settings(steps=12, lr=1e-2, rank=4, alpha=8, seq_len=32, batch=4, kd=kd, save_every=0)
        finetune(load_model(model_dir), PLAN, stream, settings, folder, progress=False)
        out[kd] = folder
    return out


def cli_run(main, argv, capsys):
    rc = run_main("cqil-x", main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# -- perplexity -------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, seq_len, stride, expected", [
    (10, 6, 3, [(0, 6, 1), (3, 9, 6), (6, 10, 9)]),
    (10, 6, 6, [(0, 6, 1), (6, 10, 7)]),  # disjoint windows: each one's first token goes unscored
    (5, 6, 3, [(0, 5, 1)]),
    (7, 4, 1, [(0, 4, 1), (1, 5, 4), (2, 6, 5), (3, 7, 6)]),
])
def test_sliding_windows(n, seq_len, stride, expected):
    assert list(sliding_windows(n, seq_len, stride)) == [Window(*w) for w in expected]


@pytest.mark.parametrize("seq_len, stride", [(1, 1), (8, 0), (8, 9)])
def test_sliding_windows_rejects(seq_len, stride):
    with pytest.raises(CqilError):
        list(sliding_windows(20, seq_len, stride))


def test_eval_p1_equals_transformers(model_dir, data_file, capsys):
    """cqil-eval of the original model = exp(mean NLL) of transformers with HF's strided recipe."""
    import transformers

    rc, out, _ = cli_run(cli.eval_main, [model_dir, "--data", data_file, "--json", "--seq-len", 32,
                                         "--stride", 12, "--max-tokens", 150], capsys)
    assert rc == 0
    ours = json.loads(out)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = torch.tensor(tok(data_file.read_text())["input_ids"][:150])[None]
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    nll_sum, scored, prev_end = 0.0, 0, 0
    for begin in range(0, ids.shape[1], 12):
        end = min(begin + 32, ids.shape[1])
        labels = ids[:, begin:end].clone()
        labels[:, :max(prev_end - begin, 0)] = -100  # only the tokens this window adds
        n = int((labels[:, 1:] != -100).sum())
        with torch.no_grad():
            nll_sum += hf(ids[:, begin:end], labels=labels).loss.item() * n
        scored, prev_end = scored + n, end
        if end == ids.shape[1]:
            break
    assert ours["tokens"] == scored == 149
    assert ours["perplexity"] == pytest.approx(math.exp(nll_sum / scored), rel=1e-5)


def test_perplexity_takes_numpy_logits():
    """A logits function may return numpy (an engine does): uniform logits give perplexity = vocab."""
    import numpy as np

    result = perplexity(lambda ids: np.zeros((*ids.shape, 7), np.float32), torch.arange(20) % 7, 8, 4)
    assert result["perplexity"] == pytest.approx(7.0) and result["tokens"] == 19


def test_eval_engine_dir(model_dir, data_file, tmp_path, capsys, monkeypatch):
    """An engine folder goes through cqil.runtime.load(...).logits; same number as the model under its plan."""
    import cqil.runtime
    from cqil.compiler.compile import compile_model

    engine = compile_model(model_dir, tmp_path / "engine", p=2, start=1, end=5, bypass=1, max_seq_len=32,
                           progress=False, log=lambda msg: None)
    monkeypatch.setattr(cqil.runtime, "load", lambda d, load=cqil.runtime.load, **kw: load(d, threads=1, **kw))
    flags = ["--data", data_file, "--json", "--seq-len", 32, "--max-tokens", 100]
    rc, out, _ = cli_run(cli.eval_main, [engine, *flags], capsys)
    assert rc == 0, out
    from_engine = json.loads(out)
    rc, out, _ = cli_run(cli.eval_main, [model_dir, "--p", 2, "--start", 1, "--end", 5, "--bypass", 1, *flags], capsys)
    from_model = json.loads(out)
    assert from_engine["kind"] == "engine" and from_engine["tokens"] == from_model["tokens"] == 99
    assert from_engine["perplexity"] == pytest.approx(from_model["perplexity"], rel=1e-4)
    rc, _, err = cli_run(cli.eval_main, [engine, "--p", 2, *flags], capsys)
    assert rc == 2 and "engine directory" in err


def test_engine_with_adapter_equals_model_with_adapter(model_dir, data_file, trained, tmp_path, capsys):
    """An engine compiled with --adapter measures what cqil-eval measures for model + adapter."""
    engine = tmp_path / "engine"
    rc, _, err = cli_run(compile_cli.main, [model_dir, "--p", PLAN.p, "--start", PLAN.start, "--end", PLAN.end,
                                            "--bypass", PLAN.bypass, "--adapter", trained[True], "-o", engine,
                                            "--max-seq-len", 32, "--no-progress"], capsys)
    assert rc == 0, err
    flags = ["--data", data_file, "--json", "--seq-len", 32, "--max-tokens", 100]
    rc, out, _ = cli_run(cli.eval_main, [engine, *flags], capsys)
    from_engine = json.loads(out)
    plan_flags = ["--p", PLAN.p, "--start", PLAN.start, "--end", PLAN.end, "--bypass", PLAN.bypass]
    rc, out, _ = cli_run(cli.eval_main, [model_dir, *plan_flags, "--adapter", trained[True], *flags], capsys)
    from_model = json.loads(out)
    rc, out, _ = cli_run(cli.eval_main, [model_dir, *plan_flags, *flags], capsys)
    untuned = json.loads(out)
    assert from_engine["perplexity"] == pytest.approx(from_model["perplexity"], rel=1e-3)
    assert abs(from_model["perplexity"] - untuned["perplexity"]) > 1e-3 * untuned["perplexity"]  # the adapter counts


# -- finetune and merge ---------------------------------------------------------------------------

@pytest.mark.parametrize("kd", [True, False], ids=["kd", "next-token"])
def test_finetune_lowers_loss(model_dir, stream, trained, kd):
    """The trained adapter, merged, lowers its own loss on a window of the training stream."""
    index = 0 if kd else 1
    before = cqil_losses(load_model(model_dir), stream[:64])[index]
    after = cqil_losses(merge_adapter(load_model(model_dir), trained[kd], PLAN), stream[:64])[index]
    assert after < 0.8 * before


def test_adapter_folder_is_standard_peft(trained):
    folder = trained[True]
    assert {"adapter_config.json", "adapter_model.safetensors", PLAN_FILE} <= {f.name for f in folder.iterdir()}
    assert Plan.from_dict(json.loads((folder / PLAN_FILE).read_text())) == PLAN
    assert not list(folder.glob(".*"))  # no temporary folders left behind
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8
    assert set(config["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_merge_equals_peft_merge_and_unload(model_dir, trained):
    """Our merge = peft's merge_and_unload on transformers' LlamaForCausalLM (the names are HF's)."""
    import peft
    import transformers

    ours = merge_adapter(load_model(model_dir), trained[True], PLAN).state_dict()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    theirs = peft.PeftModel.from_pretrained(hf, str(trained[True])).merge_and_unload().state_dict()
    original = load_model(model_dir).state_dict()
    assert set(theirs) == set(ours)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name
    assert not torch.equal(ours["model.layers.2.self_attn.q_proj.weight"], original["model.layers.2.self_attn.q_proj.weight"])


def test_merge_refuses_another_plan(model_dir, trained):
    other = Plan(6, 2, 1, 5, bypass=0)
    with pytest.raises(CqilError, match="trained for .*S1 E5, d=1.* not for .*d=0"):
        merge_adapter(load_model(model_dir), trained[True], other)
    merge_adapter(load_model(model_dir), trained[True], other, allow_plan_mismatch=True)
    # placement does not change what is computed
    merge_adapter(load_model(model_dir), trained[True], Plan(6, 2, 1, 5, bypass=1, replicate_outer=True))


def test_merge_refuses_adapter_without_plan(model_dir, trained, tmp_path):
    import shutil

    folder = shutil.copytree(trained[True], tmp_path / "noplan")
    (folder / PLAN_FILE).unlink()
    with pytest.raises(CqilError, match="no cqil_plan.json"):
        merge_adapter(load_model(model_dir), folder, PLAN)


@pytest.mark.parametrize("a, b, same", [
    (Plan(6, 2, 1, 5), Plan(6, 2, 1, 5, semantics="reference"), True),  # d=0: semantics do not matter
    (Plan(6, 2, 1, 5, bypass=1), Plan(6, 2, 1, 5, bypass=1, semantics="reference"), False),
    (Plan(6, 1, 0, 0), Plan(6, 2, 3, 3), True),  # both the original model
    (Plan(6, 2, 1, 5), Plan(6, 2, 0, 4), False),
])
def test_same_computation(a, b, same):
    assert same_computation(a, b) is same


def test_resume_equals_uninterrupted(model_dir, stream, tmp_path):
    settings = Settings(steps=4, lr=1e-2, rank=4, alpha=8, seq_len=16, batch=2, save_every=2)
    finetune(load_model(model_dir), PLAN, stream, settings, tmp_path / "full", progress=False)
    halfway = Settings(**{**settings.__dict__, "steps": 2})
    finetune(load_model(model_dir), PLAN, stream, halfway, tmp_path / "resumed", progress=False)
    result = finetune(load_model(model_dir), PLAN, stream, settings, tmp_path / "resumed", resume=True, progress=False)
    assert result["start_step"] == 2 and len(result["losses"]) == 2
    from safetensors.torch import load_file
    full = load_file(tmp_path / "full" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "adapter_model.safetensors")
    for name in full:
        torch.testing.assert_close(resumed[name], full[name], rtol=0, atol=1e-6)
    with pytest.raises(CqilError, match="other settings.*lr"):
        finetune(load_model(model_dir), PLAN, stream, Settings(**{**settings.__dict__, "lr": 1e-3}),
                 tmp_path / "resumed", resume=True, progress=False)
    with pytest.raises(CqilError, match="not empty.*--resume"):
        finetune(load_model(model_dir), PLAN, stream, settings, tmp_path / "full", progress=False)


# -- analyze ----------------------------------------------------------------------------------------

def test_analyze_cli(model_dir, data_file, tmp_path, capsys):
    plot = tmp_path / "sim.png"
    rc, out, err = cli_run(cli.analyze_main, [model_dir, "--data", data_file, "--p", 2, "--json", "--seq-len", 64,
                                              "--plot", plot], capsys)
    assert rc == 0, err
    result = json.loads(out)
    assert len(result["adjacent"]) == 5 and len(result["to_group_start"]) == 6
    assert all(-1.0 <= s <= 1.0 for s in result["adjacent"])
    suggested = Plan.from_dict(result["suggested"]["plan"])
    assert suggested.p == 2 and suggested.end <= 4 and suggested.groups
    assert result["tokens"] == len(data_file.read_bytes())
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rc, out, _ = cli_run(cli.analyze_main, [model_dir, "--data", data_file, "--p", 2, "--seq-len", 64], capsys)
    assert rc == 0 and "suggested for p=2: --start" in out


def similarity(L, adjacent, two_back=None) -> Similarity:
    back = [tuple([None] + list(adjacent))]
    if two_back is not None:
        back.append(tuple([None, None] + list(two_back)))
    return Similarity(num_layers=L, tokens=1, back=tuple(back))


@pytest.mark.parametrize("adjacent, p, threshold, expected, met", [
    # layer 1's input is unlike layer 0's, then a plateau: the longest range avoids layer 0
    ([0.3, 0.95, 0.95, 0.95, 0.95, 0.95, 0.95, 0.6, 0.9], 2, 0.9, (1, 7), True),
    # a dip between layers 3 and 4 (cos = 0.5): fine on a group boundary, as in [2, 8)
    ([0.3, 0.95, 0.95, 0.5, 0.95, 0.95, 0.95, 0.6, 0.9], 2, 0.9, (2, 8), True),
    # nothing reaches the threshold: the best single group
    ([0.3, 0.5, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1], 2, 0.9, (2, 4), False),
])
def test_suggest_range(adjacent, p, threshold, expected, met):
    s = suggest_range(similarity(10, adjacent), p, threshold)
    assert (s.plan.start, s.plan.end) == expected and s.met_threshold is met


def test_suggest_range_p3_uses_two_back():
    """p=3: the third member of a group reads the input two layers back."""
    two_back = [0.95, 0.95, 0.95, 0.95, 0.8, 0.95, 0.95, 0.95]  # cos(x_6, x_4) = 0.8: [1, 7) is out
    sim = similarity(10, [0.95] * 9, two_back)
    s = suggest_range(sim, 3, 0.9)
    assert (s.plan.start, s.plan.end) == (0, 6) and s.min_similarity == 0.95
    assert suggest_range(sim, 3, 0.75).plan.end - suggest_range(sim, 3, 0.75).plan.start == 6


def test_suggest_range_too_few_layers():
    s = suggest_range(similarity(3, [0.99, 0.99]), 2)
    assert not s.plan.groups and s.plan.num_layers == 3


# -- bad input: one line, exit 2 --------------------------------------------------------------------

@pytest.mark.parametrize("kind, message", [
    ("missing", "does not exist"), ("empty", "is empty"), ("binary", "looks binary"), ("latin1", "not UTF-8"),
])
@pytest.mark.parametrize("main", [cli.analyze_main, cli.eval_main, cli.finetune_main], ids=["analyze", "eval", "finetune"])
def test_bad_data(model_dir, tmp_path, capsys, kind, message, main):
    path = tmp_path / "data.txt"
    content = {"empty": b"  \n", "binary": b"PK\x03\x04\x00\x00weights", "latin1": "café".encode("latin-1")}
    if kind != "missing":
        path.write_bytes(content[kind])
    argv = [model_dir, "--data", path] + (["--p", 2, "--start", 1, "--end", 5, "-o", tmp_path / "out"]
                                          if main is cli.finetune_main else [])
    rc, _, err = cli_run(main, argv, capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1 and message in err and "error: data:" in err


def test_wrong_target_module(model_dir, data_file, tmp_path, capsys):
    rc, _, err = cli_run(cli.finetune_main, [model_dir, "--p", 2, "--start", 1, "--end", 5, "--data", data_file, "-o", tmp_path / "a",
                                             "--targets", "q_proj,qproj"], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "no Linear module named qproj" in err and "q_proj" in err


def test_missing_model(tmp_path, data_file, capsys):
    for main, extra in ((cli.analyze_main, []), (cli.eval_main, []), (cli.finetune_main, ["--p", 2, "-o", tmp_path / "a"])):
        rc, _, err = cli_run(main, [tmp_path / "nope", "--data", data_file, *extra], capsys)
        assert rc == 2 and "does not exist" in err and len(err.strip().splitlines()) == 1


def test_eval_adapter_for_another_plan(model_dir, data_file, trained, capsys):
    argv = [model_dir, "--data", data_file, "--p", 2, "--start", 1, "--end", 5, "--adapter", trained[True],
            "--seq-len", 32, "--max-tokens", 64, "--json"]
    rc, _, err = cli_run(cli.eval_main, argv, capsys)
    assert rc == 2 and "trained for" in err and len(err.strip().splitlines()) == 1
    rc, out, _ = cli_run(cli.eval_main, argv + ["--bypass", 1], capsys)
    assert rc == 0 and json.loads(out)["adapter"] == str(trained[True])


def test_finetune_cli_end_to_end(model_dir, data_file, tmp_path, capsys):
    out = tmp_path / "adapter"
    rc, stdout, err = cli_run(cli.finetune_main, [model_dir, "--p", 2, "--start", 1, "--end", 5, "--data", data_file,
                                                  "-o", out, "--steps", 2, "--seq-len", 16, "--batch", 1, "--rank", 2,
                                                  "--no-kd", "--save-every", 1], capsys)
    assert rc == 0, err
    assert "wrote adapter" in stdout and "loss" in err  # the progress bar shows the loss
    assert "next-token loss, fp32 on cpu" in err  # the run described on the "cqil" logger
    assert (out / PLAN_FILE).is_file() and (out / "checkpoint" / "optimizer.pt").is_file()
    rc, stdout, err = cli_run(cli.finetune_main, [model_dir, "--p", 2, "--start", 1, "--end", 5, "--data", data_file,
                                                  "-o", tmp_path / "quiet", "--steps", 1, "--seq-len", 16, "--batch",
                                                  1, "--rank", 2, "--no-kd", "--quiet"], capsys)
    assert rc == 0 and err == "" and "wrote adapter" in stdout  # --quiet: the result only
