"""lm-evaluation-harness: the `cqil` model type and `cqil-eval --tasks`, offline.

The trained fixture model (tests/fixtures/small-llama) against lm_eval's own HFLM on the same
weights in fp32, on a small local multiple-choice task (tests/fixtures/lm_eval_task: a task YAML
over a JSONL file of Python snippets); rolling log likelihoods against cqil-eval's perplexity of
the same text; an engine directory against the checkpoint under the engine's plan.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402

from cqil.cli_util import run_main  # noqa: E402
from cqil.errors import CqilError  # noqa: E402
from cqil.quality import cli  # noqa: E402
from cqil.quality.lm_eval import CqilLM  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
MODEL = FIXTURES / "small-llama"
TASKS = FIXTURES / "lm_eval_task"
P2 = dict(p=2, start=2, end=10, bypass=1)
P2_FLAGS = ["--p", "2", "--start", "2", "--end", "10", "--bypass", "1"]
PAIRS = [("def main():\n    return", " None"), ("", "import os"), ("for x in items", ":"),
         ("x = [1, 2,", " 3]\nprint(x)"), ("import os\nimport", " sys")]


def cli_run(main, argv, capsys):
    rc = run_main("cqil-eval", main, [str(a) for a in argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def requests(kind, args_list):
    return [Instance(kind, {}, args, i) for i, args in enumerate(args_list)]


@pytest.fixture(scope="module")
def hflm():
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(MODEL), device="cpu", batch_size=1, dtype="float32")


@pytest.fixture(scope="module")
def cqil_lm():
    return CqilLM(str(MODEL), batch_size=3)


def test_loglikelihood_equals_hflm(hflm, cqil_lm):
    """p=1 is the original model: the same requests score as lm_eval's transformers model (batched or not)."""
    ours = cqil_lm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    theirs = hflm.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(ours, theirs):
        assert a == pytest.approx(b, abs=1e-4) and greedy_a == greedy_b
    assert ours[-1][1] is True  # the model does know what comes after `import os`


def test_merged_continuation_is_scored():
    """`__main__'` + `:` tokenize as one token: the continuation is encoded on its own, never scored as empty."""
    lm = CqilLM(str(MODEL))
    [(score, _)] = lm.loglikelihood(requests("loglikelihood", [("if __name__ == '__main__'", ":")]),
                                    disable_tqdm=True)
    assert score < 0


def test_task_through_cqil_eval(hflm, capsys):
    """cqil-eval --tasks runs lm_eval.simple_evaluate on a local task: the same accuracy as HFLM at p=1,
    and the CQIL plan is what is evaluated when plan flags are given."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    argv = [MODEL, "--tasks", "cqil_python_mc", "--include-path", TASKS, "--limit", 8, "--json"]
    rc, out, err = cli_run(cli.eval_main, argv, capsys)
    assert rc == 0, err
    ours = json.loads(out)
    manager = TaskManager(include_path=str(TASKS), include_defaults=False)
    theirs = simple_evaluate(model=hflm, tasks=["cqil_python_mc"], task_manager=manager, log_samples=False, limit=8)
    acc = ours["tasks"]["cqil_python_mc"]["acc,none"]
    assert acc == theirs["results"]["cqil_python_mc"]["acc,none"]
    assert ours["tasks"]["cqil_python_mc"]["sample_len"] == 8 and acc >= 0.5  # 4 choices: chance is 0.25
    rc, out, err = cli_run(cli.eval_main, [*argv, *P2_FLAGS], capsys)
    assert rc == 0, err
    cqil = json.loads(out)
    assert cqil["plan"]["p"] == 2 and 0 <= cqil["tasks"]["cqil_python_mc"]["acc,none"] <= 1


def test_rolling_equals_cqil_eval_perplexity(tmp_path, capsys):
    """Under a CQIL plan, the rolling log likelihood of a text = -(mean NLL x tokens) of cqil-eval on it."""
    text = (MODEL / "heldout.txt").read_text()[:600]
    (tmp_path / "t.txt").write_text(text)
    rc, out, err = cli_run(cli.eval_main, [MODEL, *P2_FLAGS, "--data", tmp_path / "t.txt", "--seq-len", 512, "--json"],
                           capsys)
    assert rc == 0, err
    measured = json.loads(out)
    assert measured["windows"] == 1
    lm = CqilLM(str(MODEL), **P2, max_length=512)
    [rolling] = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert rolling == pytest.approx(-measured["nll"] * measured["tokens"], rel=1e-5)
    assert math.exp(-rolling / measured["tokens"]) == pytest.approx(measured["perplexity"], rel=1e-5)


def test_generate_until_equals_greedy_transformers(cqil_lm):
    import torch
    import transformers

    context, until = "def main(", ["\n\n", "return"]
    [ours] = cqil_lm.generate_until(requests("generate_until", [(context, {"until": until, "max_gen_toks": 24})]))
    tok = transformers.AutoTokenizer.from_pretrained(MODEL)
    hf = transformers.AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    ids = tok(context, return_tensors="pt")["input_ids"]
    new = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:]
    want = tok.decode(new, skip_special_tokens=True)
    for stop in until:
        want = want.split(stop)[0]
    assert ours == want and ours and "\n\n" not in ours


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A small random LLaMA with the fixture's tokenizer, compiled for P2 (its 12 layers as the fixture's)."""
    import cqil
    from cqil.testing import random_checkpoint

    root = tmp_path_factory.mktemp("lm-eval-engine")
    ckpt = random_checkpoint(root / "ckpt", "llama", init_std=0.1, vocab_size=4096, num_hidden_layers=12,
                             max_position_embeddings=128)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(MODEL / f, ckpt / f)
    return ckpt, cqil.compile(ckpt, root / "engine", max_seq_len=128, progress=False, log=lambda *a: None, **P2)


def test_engine_scores_as_its_checkpoint(engine):
    ckpt, engine_dir = engine
    from_engine, from_model = CqilLM(str(engine_dir), batch_size=2), CqilLM(str(ckpt), **P2, batch_size=2)
    a = from_engine.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    b = from_model.loglikelihood(requests("loglikelihood", PAIRS), disable_tqdm=True)
    assert [x[1] for x in a] == [x[1] for x in b]
    assert [x[0] for x in a] == pytest.approx([x[0] for x in b], abs=1e-3)
    gen = requests("generate_until", [("import", {"until": ["\n"], "max_gen_toks": 12})])
    assert from_engine.generate_until(gen) == from_model.generate_until(gen)
    with pytest.raises(CqilError, match="engine directory.*p, start"):
        CqilLM(str(engine_dir), p=2, start=2)


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "cqil_python_mc", "--data", MODEL / "heldout.txt"], "either --data"),
    ([], "either --data"),
    (["--tasks", "cqil_python_mc", "--include-path", FIXTURES / "nope"], "is not a directory"),
])
def test_bad_task_input(argv, message, capsys):
    rc, _, err = cli_run(cli.eval_main, [MODEL, *argv], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and message in err, err
