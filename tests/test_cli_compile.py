"""`cqil-compile --dry-run` on config-only folders; plan resolution; one-line errors with exit code 2.

Most cases call `run_main` in-process (what the console script does); two run the installed
console script in a subprocess (each pays a fresh `import torch`) to check the real exit status
and stderr.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cqil.cli_util import run_main
from cqil.compiler.cli import main
from cqil.model.config import ModelConfig
from cqil.plan import resolve_plan
from cqil.errors import CqilError
from cqil.plan import Plan

LLAMA2_70B = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=8192,
                  intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                  num_key_value_heads=8, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  hidden_act="silu", rope_theta=10000.0, torch_dtype="float16")
# LLaMA-7B's layer count with tiny widths: the plan logic sees 32 layers, the trace stays fast
LLAMA_32 = dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=64, intermediate_size=128,
                num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=2)
AUTHORS_P2_D1 = dict(LLAMA_32, cqil_layers=[[l, l + 1] for l in range(12, 30, 2)], d=1)


def console_script():
    script = Path(sys.executable).parent / "cqil-compile"
    if script.is_file():
        return [str(script)]
    found = shutil.which("cqil-compile")
    return [found] if found else [sys.executable, "-c", "from cqil.compiler.cli import entry; entry()"]


def run_script(*args):
    env = {k: v for k, v in os.environ.items() if k != "CQIL_DEBUG"}
    env["OMP_NUM_THREADS"] = "1"
    return subprocess.run(console_script() + [str(a) for a in args], capture_output=True, text=True,
                          timeout=120, env=env)


def run_inprocess(capsys, *args):
    rc = run_main("cqil-compile", main, [str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc, out, err, fragments):
    assert rc == 2, err
    assert out == ""
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("cqil-compile: error: ")
    for fragment in fragments:
        assert fragment in lines[0]


# -- LLaMA-2-70B shape, config.json only -----------------------------------------------------------

def test_70b_dry_run(capsys, config_dir):
    folder = config_dir(**LLAMA2_70B)
    assert os.listdir(folder) == ["config.json"]
    rc, text, err = run_inprocess(capsys, folder, "--p", "4", "--dry-run")
    assert rc == 0, err
    assert err == ""
    assert "LlamaForCausalLM, 80 layers" in text
    assert "plan (default range): p=4, range [30, 78), bypass d=0" in text
    assert "groups (12), layer:rank" in text
    assert "group  11: 74:r0  75:r1  76:r2  77:r3" in text
    assert "outer layers 0-29, 78-79: rank 0" in text
    assert "sequential depth: 80 -> 44" in text


def test_70b_dry_run_json(config_dir):
    """The installed console script, in a subprocess."""
    folder = config_dir(**LLAMA2_70B)
    result = run_script(folder, "--p", "4", "--dry-run", "--json")
    assert result.returncode == 0, result.stderr
    d = json.loads(result.stdout)
    assert d["p"] == 4
    assert (d["start"], d["end"]) == (30, 78)
    assert d["groups"] == [list(range(l, l + 4)) for l in range(30, 78, 4)]
    assert (d["original_depth"], d["sequential_depth"]) == (80, 44)
    assert d["plan_source"] == "default range"
    assert Plan.from_dict(d["plan"]) == Plan(80, 4, 30, 78)
    assert d["collectives"] == Plan(80, 4, 30, 78).collectives()
    assert d["trace_seconds"] < 30


def test_bad_plan_from_the_console_script(config_dir):
    result = run_script(config_dir(**LLAMA_32), "--p", "2", "--bypass", "2", "--dry-run")
    assert_one_line_error(result.returncode, result.stdout, result.stderr, ["d=2", "p=2"])


# -- dry run, in-process ---------------------------------------------------------------------------

@pytest.mark.parametrize("flags, expected, source", [
    (["--p", "2"], Plan(32, 2, 12, 30), "default range"),
    (["--p", "4"], Plan(32, 4, 14, 30), "default range"),
    (["--p", "1"], Plan(32, 1, 12, 30), "default range"),
    (["--p", "2", "--start", "10", "--end", "20"], Plan(32, 2, 10, 20), "flags"),
    (["--p", "4", "--end", "31"], Plan(32, 4, 15, 31), "flags"),   # start: the default, moved to fit p
    (["--p", "2", "--start", "20"], Plan(32, 2, 20, 30), "flags"),
    (["--p", "3", "--bypass", "2", "--bypass-semantics", "reference", "--replicate-outer"],
     Plan(32, 3, 12, 30, bypass=2, semantics="reference", replicate_outer=True), "default range"),
])
def test_dry_run_json(capsys, config_dir, flags, expected, source):
    rc, out, err = run_inprocess(capsys, config_dir(**LLAMA_32), *flags, "--dry-run", "--json")
    assert rc == 0, err
    d = json.loads(out)
    assert Plan.from_dict(d["plan"]) == expected
    assert d["plan_source"] == source
    assert (d["p"], d["start"], d["end"], d["bypass"]) == (expected.p, expected.start, expected.end, expected.bypass)
    assert d["groups"] == [list(g) for g in expected.groups]
    assert (d["original_depth"], d["sequential_depth"]) == (32, expected.depth)
    assert d["collectives"] == expected.collectives()
    assert d["outer_ranks"] == (list(range(expected.p)) if expected.replicate_outer else [0])
    assert {int(l): r for l, r in d["rank_of_layer"].items()} == \
        {l: expected.rank_of(l) for g in expected.groups for l in g}


def test_dry_run_text(capsys, config_dir):
    rc, out, err = run_inprocess(capsys, config_dir(**LLAMA_32), "--p", "2", "--bypass", "1", "--dry-run")
    assert rc == 0, err
    assert "plan (default range): p=2, range [12, 30), bypass d=1 (once)" in out
    assert "group   0: 12:r0  13:r1" in out
    assert "outer layers 0-11, 30-31: rank 0" in out
    assert "sequential depth: 32 -> 23" in out
    assert "collectives per forward pass: 19 (1 broadcast, 9 all_gather, 9 all_reduce)" in out


# -- the authors' config keys ----------------------------------------------------------------------

def test_authors_keys_picked_up_by_resolve_plan(config_dir):
    cfg = ModelConfig.from_dir(config_dir(**AUTHORS_P2_D1))
    # the authors' adapters were trained with their code's residual: "reference" unless told otherwise
    assert resolve_plan(cfg.num_layers, authors=cfg.extra) == (Plan(32, 2, 12, 30, bypass=1, semantics="reference"),
                                 "checkpoint config (cqil_layers)")
    assert resolve_plan(cfg.num_layers, authors=cfg.extra, p=2, semantics="once")[0] == Plan(32, 2, 12, 30, bypass=1, semantics="once")
    assert resolve_plan(cfg.num_layers, authors=cfg.extra, bypass=0)[0] == Plan(32, 2, 12, 30)
    assert resolve_plan(cfg.num_layers, authors=cfg.extra, p=2, start=4, end=8) == (Plan(32, 2, 4, 8), "flags")  # flags override
    with pytest.raises(CqilError, match=r"cqil_layers use p=2, but --p 4 was given"):
        resolve_plan(cfg.num_layers, authors=cfg.extra, p=4)


def test_authors_keys_picked_up_by_dry_run(capsys, config_dir):
    folder = config_dir(**AUTHORS_P2_D1)
    rc, out, err = run_inprocess(capsys, folder, "--dry-run", "--json")  # no --p needed
    assert rc == 0, err
    d = json.loads(out)
    assert d["plan_source"] == "checkpoint config (cqil_layers)"
    assert (d["p"], d["start"], d["end"], d["bypass"], d["sequential_depth"]) == (2, 12, 30, 1, 23)
    assert_one_line_error(*run_inprocess(capsys, folder, "--p", "4", "--dry-run"), ["p=2", "--p 4"])


def test_authors_p4_config(capsys, config_dir):
    folder = config_dir(**LLAMA_32, cqil_layers=[list(range(l, l + 4)) for l in range(14, 30, 4)], d=0)
    rc, out, err = run_inprocess(capsys, folder, "--dry-run", "--json")
    assert rc == 0, err
    assert Plan.from_dict(json.loads(out)["plan"]) == Plan(32, 4, 14, 30)


def test_bad_authors_config(capsys, config_dir):
    folder = config_dir(**LLAMA_32, cqil_layers=[[12, 13], [15, 16]], d=0)
    assert_one_line_error(*run_inprocess(capsys, folder, "--dry-run"),
                          ["cqil_layers", "[[12, 13], [15, 16]]", "expected [[12, 13], [14, 15]]"])


# -- one-line errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, fragments", [
    (["--p", "2", "--start", "13", "--end", "30"], ["end - start = 17", "p=2"]),
    (["--p", "4", "--start", "12", "--end", "30"], ["end - start = 18", "p=4"]),
    (["--p", "2", "--bypass", "2"], ["d=2", "p=2"]),
    (["--p", "2", "--bypass", "-1"], ["d=-1"]),
    (["--p", "2", "--start", "0", "--end", "40"], ["end=40", "num_layers=32"]),
    (["--p", "2", "--start", "20", "--end", "10"], ["start=20", "end=10"]),
    (["--p", "0"], ["p=0"]),
    (["--p", "-2"], ["p=-2"]),
    ([], ["--p"]),
])
def test_bad_plan(capsys, config_dir, flags, fragments):
    assert_one_line_error(*run_inprocess(capsys, config_dir(**LLAMA_32), *flags, "--dry-run"), fragments)


@pytest.mark.parametrize("config, fragments", [
    (dict(LLAMA_32, architectures=["GPT2LMHeadModel"]), ["'GPT2LMHeadModel'", "not supported"]),
    (dict(LLAMA_32, rope_parameters={"rope_type": "yarn", "factor": 2.0}), ["'yarn'"]),
    (dict(LLAMA_32, hidden_act="gelu_new"), ["hidden_act='gelu_new'"]),
    ({k: v for k, v in LLAMA_32.items() if k != "num_hidden_layers"}, ["'num_hidden_layers'"]),
])
def test_bad_config(capsys, config_dir, config, fragments):
    assert_one_line_error(*run_inprocess(capsys, config_dir(**config), "--p", "2", "--dry-run"), fragments)


def test_bad_checkpoint_folder(capsys, tmp_path):
    assert_one_line_error(*run_inprocess(capsys, tmp_path / "missing", "--p", "2", "--dry-run"), ["does not exist"])
    assert_one_line_error(*run_inprocess(capsys, tmp_path, "--p", "2", "--dry-run"), ["has no config.json"])
    (tmp_path / "config.json").write_text("{")
    assert_one_line_error(*run_inprocess(capsys, tmp_path, "--p", "2", "--dry-run"), ["not valid JSON"])
    assert_one_line_error(*run_inprocess(capsys, tmp_path / "config.json", "--p", "2", "--dry-run"),
                          ["is not a directory"])
