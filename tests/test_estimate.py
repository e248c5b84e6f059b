"""The latency model (`cqil.compiler.estimate`), hand-computed, and `cqil-compile --dry-run --estimate`.

The toy cases use a 2-layer model on a made-up device whose numbers turn bytes and flops into
microseconds one for one, so every expected time below is a sum that can be checked by hand.
"""

import json
from dataclasses import replace

import pytest

from cqil.cli_util import run_main
from cqil.compiler.cli import main
from cqil.compiler.estimate import (LAYER_KERNELS, Work, auto_candidates, embed_work, estimate, format_candidates,
                                    head_work, layer_work)
from cqil.compiler.hardware import NAMES, PROFILES, Hardware, hardware, measure_cpu
from cqil.errors import CqilError
from cqil.model.config import ModelConfig
from cqil.plan import Plan

# hidden 4, 2 heads of 2 (no GQA), intermediate 8, vocab 10, fp32
TOY = ModelConfig(architecture="LlamaForCausalLM", vocab_size=10, hidden_size=4, intermediate_size=8, num_layers=2,
                  num_heads=2, num_kv_heads=2, head_dim=2, max_position_embeddings=16)
# 1 byte/us memory (1e-3 GB/s), 1 flop/us, 10 us per kernel, link 1 byte/us, 5 us per step
DEVICE = Hardware("toy", "made up", memory_gbs=1e-3, peak_tflops=1e-6, launch_us=10.0, link_gbs=1e-3,
                  allreduce_us=((2, 7.0),), allgather_us=((2, 3.0),), step_us=5.0)
LLAMA_7B = ModelConfig(architecture="LlamaForCausalLM", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                       num_layers=32, num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=2048,
                       torch_dtype="float16")

# Per toy layer at context 2: weights 4*12 (q, k, v) + 16 (o) + 96 (gate, up, down) + 8 (norms) = 168
# floats = 672 B; KV read 2*4*2 floats = 64 B; KV write 2*4 floats = 32 B: 768 B -> 768 us.
# Flops 2*160 + 4*4*2 = 352 -> 352 us, under 768: memory-bound. Launches 17 x 10 us = 170 us.
LAYER_US = 768 + 170
EMBED_US = 16 + 10  # one row of 4 floats, one gather
HEAD_US = 176 + 30  # final norm 4 + lm_head 40 floats = 176 B (80 flops); norm, lm_head, argmax
MESSAGE_US = 16  # [1, 1, 4] fp32 over a 1 byte/us link


def test_toy_pieces_by_hand():
    assert LAYER_KERNELS == 17
    assert layer_work(TOY, batch=1, context=2, nbytes=4) == Work(768, 352, 17)
    assert layer_work(TOY, batch=3, context=0, nbytes=2) == Work(168 * 2 + 3 * 16, 3 * 320, 17)
    assert embed_work(TOY, batch=1, nbytes=4) == Work(16, 0, 1)
    assert head_work(TOY, batch=1, nbytes=4) == Work(176, 80, 3)


def test_toy_sequential_and_plan_by_hand():
    e = estimate(TOY, Plan(2, 2, 0, 2), DEVICE, context=2)
    assert e.dtype == "float32"
    assert e.sequential.total_us == pytest.approx(5 + EMBED_US + HEAD_US + 2 * LAYER_US)  # 2113
    # one group: both layers at once, on two devices; then broadcast (3 + 16) and all-reduce (7 + 2*1/2*16)
    assert e.planned.collective_us == pytest.approx((3 + MESSAGE_US) + (7 + MESSAGE_US))
    assert e.plan_ms * 1e3 == pytest.approx(5 + EMBED_US + HEAD_US + LAYER_US + 42)  # 1217
    assert e.latency_reduction == pytest.approx(1 - 1217 / 2113)
    assert e.ideal_reduction == 0.5
    b = e.to_dict()["breakdown"]["plan"]
    assert b["weights_kv_ms"] == pytest.approx((16 + 176 + 768) / 1e3)
    assert b["launch_ms"] == pytest.approx((10 + 30 + 170) / 1e3)
    assert b["host_ms"] == 0.005 and b["collective_ms"] == 0.042


def test_toy_shared_memory_bypass_replicated_and_compute_bound():
    shared = estimate(TOY, Plan(2, 2, 0, 2), replace(DEVICE, shared_memory=True), context=2)
    # one memory bus: the two members' 1536 bytes queue for it; their launches still overlap
    assert shared.plan_ms * 1e3 == pytest.approx(5 + EMBED_US + HEAD_US + (1536 + 170) + 42)
    bypass = estimate(TOY, Plan(2, 2, 0, 2, bypass=1), DEVICE, context=2)
    # member 1 adds member 0's attention output (one more kernel); an all-gather (3 + 1*16) joins
    assert bypass.plan_ms * 1e3 == pytest.approx(5 + EMBED_US + HEAD_US + (LAYER_US + 10) + 42 + 19)
    replicated = estimate(TOY, Plan(2, 2, 0, 2, replicate_outer=True), DEVICE, context=2)
    assert replicated.planned.collective_us == pytest.approx(23)  # no broadcast
    slow = estimate(TOY, Plan(2, 2, 0, 2), replace(DEVICE, peak_tflops=0.25e-6), context=2)
    # 0.25 flop/us: a layer's 352 flops take 1408 us > 768 us; the head's 80 take 320 us > 176
    assert slow.sequential.total_us == pytest.approx(5 + EMBED_US + (320 + 30) + 2 * (1408 + 170))
    p1 = estimate(TOY, Plan(2, 1, 0, 0), DEVICE, context=2)
    assert p1.plan_ms == p1.sequential_ms and p1.latency_reduction == 0


def test_llama_7b_on_a100_nvlink():
    hw = PROFILES["a100-nvlink"]
    # weights of one layer: 4096*12288 + 4096*4096 + 3*4096*11008 + 2*4096 = 202,383,360 fp16 values
    work = layer_work(LLAMA_7B, batch=1, context=0, nbytes=2)
    assert work.bytes == 202_383_360 * 2 + 2 * 4096 * 2
    p2 = estimate(LLAMA_7B, Plan(32, 2, 12, 30), hw, context=128)
    p4 = estimate(LLAMA_7B, Plan(32, 4, 14, 30), hw, context=128)
    # 32 layers at ~0.2 ms (405 MB at 2,039 GB/s) + 17 us of launches, + lm_head (262 MB)
    assert 6.5 < p2.sequential_ms < 7.5
    assert 0 < p2.latency_reduction < p2.ideal_reduction == pytest.approx(9 / 32)
    assert p2.latency_reduction < p4.latency_reduction < p4.ideal_reduction == pytest.approx(12 / 32)
    assert p2.planned.collective_us == pytest.approx(hw.collective_us("broadcast", 2) + 9 * hw.collective_us(
        "all_reduce", 2) + 8192 / 300e3 + 9 * 8192 / 300e3)


def test_collective_tables_interpolate_and_extrapolate():
    hw = PROFILES["a100-nvlink"]
    assert hw.collective_us("all_reduce", 2) == 10.14  # measured (NVIDIA/nccl#583)
    assert hw.collective_us("all_reduce", 1) == 0
    assert hw.collective_us("all_reduce", 3) == pytest.approx((10.14 + 12.02) / 2)
    assert hw.collective_us("all_reduce", 16) == pytest.approx(15.78 + (15.78 - 12.02) / 4 * 8)
    assert hw.collective_us("broadcast", 4) == hw.collective_us("all_gather", 4)
    assert PROFILES["a100-pcie"].collective_us("all_reduce", 8) > hw.collective_us("all_reduce", 8)
    assert {"a100-nvlink", "a100-pcie", "h100-sxm", "h200", "l40s", "cpu"} <= set(NAMES)


def test_bad_inputs_are_refused():
    with pytest.raises(CqilError, match="unknown hardware 'tpu'; profiles: a100-nvlink"):
        hardware("tpu")
    with pytest.raises(CqilError, match="the plan is for 32 layers"):
        estimate(TOY, Plan(32, 2, 12, 30), DEVICE)
    with pytest.raises(CqilError, match="batch must be an integer >= 1"):
        estimate(TOY, Plan(2, 2, 0, 2), DEVICE, batch=0)
    with pytest.raises(CqilError, match="memory_gbs must be > 0"):
        replace(DEVICE, memory_gbs=0)


def test_cpu_profile_is_measured():
    hw = measure_cpu(threads=1, copy_mb=16)
    assert hw.name == "cpu" and hw.shared_memory
    assert hw.memory_gbs > 0.1 and hw.peak_tflops > 0 and hw.launch_us >= 0 and hw.step_us > 0
    assert [p for p, _ in hw.allreduce_us] == [2, 4, 8] and all(us > 0 for _, us in hw.allreduce_us)


def test_auto_candidates_best_first():
    hw = PROFILES["h200"]
    cands = auto_candidates(LLAMA_7B, hw)
    assert [c.plan.p for c in cands] == [8, 4, 2]  # more ranks, shorter critical path, on NVLink
    assert [c.estimate.plan_ms for c in cands] == sorted(c.estimate.plan_ms for c in cands)
    for c in cands:
        assert c.plan == Plan.default(32, c.plan.p) and c.source == "default range"
        assert c.estimate.plan_ms == estimate(LLAMA_7B, c.plan, hw).plan_ms
    # on one shared memory bus, with free launches, a plan only adds collectives; the listing says so
    shared = auto_candidates(LLAMA_7B, replace(hw, name="bus", shared_memory=True, launch_us=0))
    assert all(c.estimate.latency_reduction < 0 for c in shared)
    assert "none is predicted faster than the sequential model" in format_candidates(shared)
    authors = replace(LLAMA_7B, extra={"cqil_layers": [[l, l + 1] for l in range(12, 30, 2)], "d": 1})
    sources = {c.source for c in auto_candidates(authors, hw)}
    assert "checkpoint config (cqil_layers)" in sources


# -- cqil-compile --dry-run --estimate ----------------------------------------------------------------

TINY_32 = dict(architectures=["LlamaForCausalLM"], vocab_size=128, hidden_size=64, intermediate_size=128,
               num_hidden_layers=32, num_attention_heads=4, num_key_value_heads=2, torch_dtype="float16")


def cli(capsys, *args):
    try:
        rc = run_main("cqil-compile", main, [str(a) for a in args])
    except SystemExit as e:  # argparse's own refusals exit from parse_args
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_json_estimate(capsys, config_dir):
    folder = config_dir(**TINY_32)
    rc, out, err = cli(capsys, folder, "--p", "2", "--dry-run", "--json", "--estimate", "a100-nvlink")
    assert rc == 0, err
    d = json.loads(out)["estimate"]
    assert {"sequential_ms", "plan_ms", "latency_reduction", "breakdown", "hardware"} <= set(d)
    assert d["latency_reduction"] == pytest.approx(1 - d["plan_ms"] / d["sequential_ms"], abs=1e-3)
    assert d["hardware"]["name"] == "a100-nvlink" and d["dtype"] == "float16" and d["context"] == 128
    assert set(d["breakdown"]["plan"]) == {"weights_kv_ms", "launch_ms", "collective_ms", "host_ms", "total_ms"}
    cfg = ModelConfig.from_dir(folder)
    assert d["plan_ms"] == pytest.approx(estimate(cfg, Plan(32, 2, 12, 30), PROFILES["a100-nvlink"]).plan_ms, abs=1e-4)


def test_cli_text_estimate(capsys, config_dir):
    rc, out, err = cli(capsys, config_dir(**TINY_32), "--p", "4", "--dry-run", "--estimate", "l40s",
                       "--estimate-batch", "2", "--estimate-context", "64", "--dtype", "float32")
    assert rc == 0, err
    assert "latency estimate, decode ms/token on l40s" in out and "float32, batch 2, context 64" in out
    for row in ("weights + KV read", "kernel launches", "collectives", "host (per step)", "total"):
        assert row in out
    assert "critical-path ideal 37.5% (depth 32 -> 20)" in out


def test_cli_p_auto(capsys, config_dir):
    folder = config_dir(**TINY_32)
    rc, out, err = cli(capsys, folder, "--p", "auto", "--dry-run", "--json", "--estimate", "h100-sxm")
    assert rc == 0, err
    d = json.loads(out)
    cands = d["estimate"]["candidates"]
    best = min(cands, key=lambda c: c["plan_ms"])
    assert cands[0] == best and (d["p"], d["start"], d["end"]) == (best["p"], best["start"], best["end"])
    assert d["plan_source"].startswith("--p auto: default range, best predicted on h100-sxm")
    assert {c["p"] for c in cands} == {2, 4, 8}
    rc, out, err = cli(capsys, folder, "--p", "auto", "--dry-run", "--estimate", "h100-sxm", "--start", "20")
    assert rc == 0, err
    assert "--p auto: candidates, best predicted first" in out and "[20, 30)" in out


@pytest.mark.parametrize("args, fragment", [
    (["--p", "2", "--dry-run", "--estimate", "tpu"], "unknown hardware 'tpu'; profiles: a100-nvlink, a100-pcie"),
    (["--p", "auto", "--dry-run"], "--p auto needs --estimate HW"),
    (["--p", "2", "--estimate", "h200", "-o", "engine"], "go with --dry-run"),
    (["--p", "two", "--dry-run"], "invalid value 'two': give an integer or 'auto'"),
    (["--p", "2", "--dry-run", "--estimate", "h200", "--estimate-batch", "0"], "batch must be an integer >= 1"),
])
def test_cli_refusals_are_one_line(capsys, config_dir, args, fragment):
    rc, out, err = cli(capsys, config_dir(**TINY_32), *args)
    assert rc == 2 and out == "" and "Traceback" not in err
    assert len(err.splitlines()) == 1 and fragment in err
