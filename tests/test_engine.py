"""End to end: compile tiny checkpoints, run them with the ONNX Runtime engine, compare with PyTorch.

Each engine must match the PyTorch reference of the same plan (`build_graph`): fp32 logits within
1e-4 and the same greedy tokens for 32 steps. The engines cover, between them, p in {1, 2, 4},
bypass d in {0, 1}, both bypass semantics, outer layers on rank 0 and replicated, a GQA config
("llama", 4 heads / 2 kv heads) and a tied-embedding llama3-rope config with kv_heads=1 and an
explicit head_dim ("llama3"). Each engine is compiled once for the module.
"""

from __future__ import annotations

import inspect
import shutil
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

from cqil.plan import Plan
from engine_util import (ATOL, STD, STEPS, compile_engine, max_diff, new_tokens, open_engine, reference,
                         reference_greedy, reference_logits)

# name -> (preset, layers, plan options); every plan has real groups and outer layers or none
ENGINES = {
    "p4_d1_reference": ("llama", 6, dict(p=4, start=1, end=5, bypass=1, semantics="reference")),
    "p2_d1_once_tied": ("llama3", 6, dict(p=2, start=1, end=5, bypass=1, semantics="once")),
    "p2_d0_replicated": ("llama", 6, dict(p=2, start=2, end=6, bypass=0, replicate_outer=True)),
    "p1": ("llama3", 6, dict(p=1)),
}


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint):
    return {name: tiny_checkpoint(preset, init_std=STD, num_hidden_layers=layers)
            for name, (preset, layers, _) in ENGINES.items()}


@pytest.fixture(scope="module")
def engines(checkpoints, tmp_path_factory):
    """Compiled lazily, once per module: name -> engine directory."""
    root = tmp_path_factory.mktemp("engines")
    done = {}

    def get(name):
        if name not in done:
            done[name] = compile_engine(checkpoints[name], root / name, **ENGINES[name][2])
        return done[name]

    return get


@pytest.fixture(scope="module")
def opened(engines):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = open_engine(engines(name))
        return cache[name]

    yield get
    for engine in cache.values():
        engine.close()


def random_ids(vocab, shape, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, shape, dtype=np.int64)


@pytest.mark.parametrize("name", list(ENGINES))
def test_engine_matches_reference_of_its_plan(name, opened, checkpoints):
    engine = opened(name)
    preset, layers, options = ENGINES[name]
    plan = engine.plan
    assert (plan.p, plan.bypass, plan.num_layers) == (options["p"], options.get("bypass", 0), layers)
    assert plan.p == 1 or plan.groups, "the range must hold groups for the test to mean anything"
    assert plan.p == 1 or plan.start > 0, "outer layers before the range are part of the test"
    assert len(engine.ranks) == plan.p
    model, gm = reference(checkpoints[name], plan)

    ids = random_ids(engine.config.vocab_size, (2, 9))
    ref = reference_logits(model, gm, ids)
    assert np.abs(ref).max() > 1.0  # logits far from uniform: the tolerance below has teeth
    diff = max_diff(engine.logits(ids), ref)
    assert diff <= ATOL, f"{name}: prefill logits differ by {diff:.2e}"

    expected = reference_greedy(model, gm, ids)
    got = new_tokens(engine, ids)
    assert (got == expected).all(), f"{name}: greedy tokens differ from step {np.argmax(~(got == expected).all(0))}"
    assert len(set(expected.ravel().tolist())) > 4  # decoding did not collapse onto one token


def test_plans_really_change_the_computation(opened, checkpoints):
    """The p=4 engine differs from the original model and from the other bypass semantics, by far
    more than the tolerance: the reference comparison above cannot pass by accident."""
    engine = opened("p4_d1_reference")
    ids = random_ids(engine.config.vocab_size, (1, 9), seed=1)
    got = engine.logits(ids)
    L, S, E = engine.plan.num_layers, engine.plan.start, engine.plan.end
    for other in (Plan(L, 1, 0, 0), Plan(L, 4, S, E, bypass=1, semantics="once"), Plan(L, 4, S, E, bypass=0)):
        model, gm = reference(checkpoints["p4_d1_reference"], other)
        assert max_diff(got, reference_logits(model, gm, ids)) > 100 * ATOL, f"engine equals {other}"


def test_batch_with_left_padding_matches_single_runs(opened):
    engine = opened("p4_d1_reference")
    rng = np.random.default_rng(2)
    prompts = [rng.integers(0, engine.config.vocab_size, n).tolist() for n in (5, 11, 2)]
    batch_logits = engine.logits(prompts)  # [3, 11, V], left-padded
    batch_tokens = engine.generate(prompts, max_new_tokens=STEPS)
    for b, prompt in enumerate(prompts):
        single = engine.logits([prompt])[0]
        diff = max_diff(batch_logits[b, -len(prompt):], single)
        assert diff <= ATOL, f"row {b}: logits differ by {diff:.2e} from a batch-1 run"
        assert batch_tokens[b] == engine.generate([prompt], max_new_tokens=STEPS)[0], f"row {b}"
        assert batch_tokens[b][:len(prompt)] == prompt and len(batch_tokens[b]) == len(prompt) + STEPS


def hf_greedy(hf, ids: torch.Tensor, steps: int) -> tuple[torch.Tensor, list[int]]:
    """transformers' own greedy decoding with its KV cache -> (prefill logits, new tokens)."""
    kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = hf(input_ids=ids, use_cache=True)
        prefill, tokens = out.logits, []
        for _ in range(steps):
            token = out.logits[:, -1:].argmax(-1)
            tokens.append(token)
            out = hf(input_ids=token, use_cache=True, **{kw: out[kw]})
    return prefill, torch.cat(tokens, 1)


def test_p1_engine_matches_transformers(opened, checkpoints, hf_model):
    engine = opened("p1")
    hf = hf_model(checkpoints["p1"])
    ids = random_ids(engine.config.vocab_size, (2, 9), seed=3)
    prefill, tokens = hf_greedy(hf, torch.from_numpy(ids), STEPS)
    diff = max_diff(engine.logits(ids), prefill.numpy())
    assert diff <= ATOL, f"prefill logits differ from transformers by {diff:.2e}"
    assert (new_tokens(engine, ids) == tokens.numpy()).all()


# -- the exported files are plain ONNX ----------------------------------------------------------

def step_dims(batch: int, sequence: int, past: int) -> dict[str, int]:
    return {"batch": batch, "sequence": sequence, "past_sequence": past, "total_sequence": past + sequence}


# a prompt, a batched decode step, a chunk after a past (ONNX Runtime's fused attention, in the
# default engines, takes several new tokens after a past only at batch 1: cqil runs rows one by one)
SHAPES = [step_dims(2, 3, 0), step_dims(2, 1, 6), step_dims(1, 3, 4)]


def onnx_inputs(path, dims: dict[str, int] = SHAPES[-1]) -> dict[str, tuple[list[int], str]]:
    """name -> (concrete shape, ONNX type), from the file alone."""
    import onnx

    model = onnx.load(str(path))
    result = {}
    for i in model.graph.input:
        axes = [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
        shape = [dims[d] if isinstance(d, str) else d for d in axes]
        result[i.name] = (shape, onnx.helper.tensor_dtype_to_np_dtype(i.type.tensor_type.elem_type))
    return result


@pytest.mark.parametrize("name", list(ENGINES))
def test_every_onnx_file_runs_in_a_plain_session(name, engines):
    files = sorted(engines(name).glob("rank*/*.onnx"))
    assert len(files) >= (1 if name == "p1" else 3)
    rng = np.random.default_rng(0)
    for path in files:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        for dims in SHAPES:
            feeds = {}
            for n, (shape, dtype) in onnx_inputs(path, dims).items():
                assert n in {i.name for i in session.get_inputs()}
                # int inputs: ids, positions and the 0/1 mask; 1 is valid for all of them
                feeds[n] = np.ones(shape, dtype) if dtype == np.int64 else rng.standard_normal(shape).astype(dtype)
            outputs = session.run(None, feeds)
            assert outputs and all(np.isfinite(o).all() for o in outputs if o.dtype.kind == "f"), (path, dims)


def polygraphy(path) -> subprocess.CompletedProcess:
    shapes = [f"{n}:[{','.join(map(str, s))}]" for n, (s, _) in onnx_inputs(path).items()]
    cmd = [sys.executable, "-m", "polygraphy", "run", str(path), "--onnxrt", "--input-shapes", *shapes]
    if shutil.which("polygraphy"):
        cmd = ["polygraphy", *cmd[3:]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_segments_run_under_polygraphy(engines):
    """`polygraphy run --onnxrt`, no project code, on a group segment of rank 1 of the p=4 engine: its
    inputs are collective results (the group input) and values rank 1 computed itself (rope, mask).
    One file only: each polygraphy process takes seconds; the plain-session test covers every file."""
    path = engines("p4_d1_reference") / "rank1" / "seg1.onnx"
    assert {"group0.input", "attention_bias"} <= set(onnx_inputs(path))
    result = polygraphy(path)
    assert result.returncode == 0 and "PASSED" in result.stdout, (result.stdout[-2000:], result.stderr[-2000:])


# -- float16 ------------------------------------------------------------------------------------

FP16_ATOL = 5e-2  # logits of magnitude ~3 through 8 layers in half precision


def test_fp16_engine_is_close_to_fp32(checkpoints, tmp_path_factory):
    name = "p2_d1_once_tied"
    options = ENGINES[name][2]
    out = compile_engine(checkpoints[name], tmp_path_factory.mktemp("fp16") / "engine", dtype="float16", **options)
    try:
        engine = open_engine(out)
    except Exception as e:  # pragma: no cover - depends on the onnxruntime build
        if "NOT_IMPLEMENTED" in str(e) or "Could not find an implementation" in str(e):
            pytest.skip(f"onnxruntime CPU lacks a float16 kernel: {e}")
        raise
    assert engine.manifest["dtype"] == "float16"
    kinds = {t["name"].split(".")[0]: t["dtype"] for r in engine.manifest["ranks"] for s in r["segments"]
             for t in s["inputs"] + s["outputs"]}
    assert kinds["logits"] == kinds["present"] == kinds["past_key_values"] == kinds["hidden"] == "float16"
    ids = random_ids(engine.config.vocab_size, (2, 9), seed=4)
    model, gm = reference(checkpoints[name], engine.plan)
    ref = reference_logits(model, gm, ids)
    diff = max_diff(engine.logits(ids), ref)
    assert ATOL < diff <= FP16_ATOL, f"fp16 logits differ from fp32 by {diff:.2e}"
    assert len(engine.generate(ids, max_new_tokens=8)[0]) == 9 + 8
    engine.close()


def test_range_from_layer_0_broadcasts_the_embedding(tiny_checkpoint, tmp_path):
    """start=0 without replication: rank 0 runs no layer before the range, only the embedding
    (and, tied, the same weight as lm_head), and must still compute what it broadcasts."""
    model_dir = tiny_checkpoint("llama3", init_std=STD, num_hidden_layers=6)
    engine = open_engine(compile_engine(model_dir, tmp_path / "e", p=2, start=0, end=4, bypass=1))
    model, gm = reference(model_dir, engine.plan)
    ids = np.random.default_rng(3).integers(0, 256, (2, 7))
    assert max_diff(engine.logits(ids), reference_logits(model, gm, ids)) <= ATOL

