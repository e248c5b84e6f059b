"""Latency model: predicted decode time per token of the sequential model and of a CQIL plan.

A roofline per layer plus fixed costs, from a `Hardware` profile (`cqil.compiler.hardware`)::

    layer  = max(bytes read / memory bandwidth, flops / peak) + kernels x launch cost
    model  = host step + embedding + sum(layers) + final norm and lm_head
    plan   = host step + embedding + prefix layers
             + sum over groups (max over members + the group's collectives) + suffix + lm_head

Group members run at the same time on different devices, so a group costs its slowest member;
on hardware whose ranks share one memory bus (`shared_memory`, the CPU) they divide the bandwidth
instead. Outer layers run on rank 0 (replicated or not, they are on the critical path once).
Collectives are the plan's own list (`Plan.collectives()`): small-message latency plus bytes over
the link. Worked example (hand-checked in tests/test_estimate.py): LLaMA-7B in fp16 on
`a100-nvlink`, one layer reads 405 MB of weights: 0.199 ms at 2,039 GB/s, plus 17 launches of
1 us; p=2 S12 E30 has 23 layers on the critical path instead of 32, plus 9 all-reduces of ~10 us.

Left out: prefill (decode only), overlap of launches with work, kernel efficiency below the
roofline, caches, power-limited clocks, load imbalance beyond layer sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cqil.compiler.hardware import Hardware
from cqil.errors import CqilError
from cqil.model.config import ModelConfig
from cqil.plan import Plan, resolve_plan

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
# Kernels of one decoder layer at decode time, as an engine runs them: input norm, q/k/v
# projections (3), rope on q and k (2), KV-cache writes (2), attention, o projection, residual add,
# post-attention norm, gate, up, SiLU x up, down, residual add.
LAYER_KERNELS = 17
EMBED_KERNELS = 1  # the gather
HEAD_KERNELS = 3  # final norm, lm_head, argmax
AUTO_P = (2, 4, 8)  # one node's GPUs; the hardware tables list collective latencies for these
DEFAULT_CONTEXT = 128


@dataclass(frozen=True)
class Work:
    """What one piece of a decode step asks of a device."""

    bytes: float
    flops: float
    kernels: int


def engine_dtype(cfg: ModelConfig, dtype: str | None = None) -> str:
    """`--dtype auto` as the compiler resolves it: the checkpoint's dtype, float32 when it has none we take."""
    if dtype in (None, "auto"):
        return cfg.torch_dtype if cfg.torch_dtype in DTYPE_BYTES else "float32"
    if dtype not in DTYPE_BYTES:
        raise CqilError(f"estimate: dtype must be one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    return dtype


def layer_work(cfg: ModelConfig, batch: int, context: int, nbytes: int, extra_kernels: int = 0) -> Work:
    """One decoder layer for one new token per sequence, with `context` tokens already cached."""
    H, kv = cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim
    q = cfg.num_heads * cfg.head_dim
    linear = H * (q + 2 * kv) + q * H + 3 * H * cfg.intermediate_size
    biases = (q + 2 * kv) * cfg.qkv_bias + H * cfg.o_bias + (2 * cfg.intermediate_size + H) * cfg.mlp_bias
    weights = (linear + biases + 2 * H) * nbytes  # + the two norms
    kv_read = 2 * kv * context * batch * nbytes
    kv_write = 2 * kv * batch * nbytes
    flops = 2 * linear * batch + 4 * q * context * batch  # projections; scores and weighted values
    return Work(weights + kv_read + kv_write, flops, LAYER_KERNELS + extra_kernels)


def embed_work(cfg: ModelConfig, batch: int, nbytes: int) -> Work:
    return Work(batch * cfg.hidden_size * nbytes, 0, EMBED_KERNELS)  # one row per sequence


def head_work(cfg: ModelConfig, batch: int, nbytes: int) -> Work:
    H, V = cfg.hidden_size, cfg.vocab_size
    return Work((H + V * H) * nbytes, 2 * V * H * batch, HEAD_KERNELS)


@dataclass
class Breakdown:
    """Microseconds of one decode step by cause, on the critical path."""

    weights_kv_us: float = 0.0
    launch_us: float = 0.0
    collective_us: float = 0.0
    host_us: float = 0.0

    @property
    def total_us(self) -> float:
        return self.weights_kv_us + self.launch_us + self.collective_us + self.host_us

    def add(self, roof_us: float, launch_us: float):
        self.weights_kv_us += roof_us
        self.launch_us += launch_us

    def to_dict(self) -> dict:
        return {"weights_kv_ms": round(self.weights_kv_us / 1e3, 4), "launch_ms": round(self.launch_us / 1e3, 4),
                "collective_ms": round(self.collective_us / 1e3, 4), "host_ms": round(self.host_us / 1e3, 4),
                "total_ms": round(self.total_us / 1e3, 4)}


def _roof_us(hw: Hardware, nbytes: float, flops: float) -> float:
    return max(nbytes / (hw.memory_gbs * 1e3), flops / (hw.peak_tflops * 1e6))


def _run(hw: Hardware, w: Work) -> tuple[float, float]:
    """(roofline us, launch us) of `w` alone on one device."""
    return _roof_us(hw, w.bytes, w.flops), w.kernels * hw.launch_us


def _concurrent(hw: Hardware, works: list[Work]) -> tuple[float, float]:
    """(roofline us, launch us) of a group's members running at once, one per rank."""
    if hw.shared_memory:  # one bus: the members' bytes queue for it; launches still overlap
        return (_roof_us(hw, sum(w.bytes for w in works), sum(w.flops for w in works)),
                max(w.kernels for w in works) * hw.launch_us)
    return max((_run(hw, w) for w in works), key=sum)


def collective_us(hw: Hardware, kind: str, p: int, nbytes: int) -> float:
    """Latency plus link time of one collective on messages of `nbytes` per rank (ring algorithms)."""
    link = nbytes / (hw.link_gbs * 1e3)
    factor = {"all_reduce": 2 * (p - 1) / p, "all_gather": p - 1, "broadcast": 1}[kind]
    return hw.collective_us(kind, p) + factor * link


@dataclass(frozen=True)
class Estimate:
    """Predicted decode ms/token of the sequential model and of `plan` on `hardware`."""

    plan: Plan
    hardware: Hardware
    dtype: str
    batch: int
    context: int
    sequential: Breakdown = field(compare=False)
    planned: Breakdown = field(compare=False)

    @property
    def sequential_ms(self) -> float:
        return self.sequential.total_us / 1e3

    @property
    def plan_ms(self) -> float:
        return self.planned.total_us / 1e3

    @property
    def latency_reduction(self) -> float:
        return 1 - self.plan_ms / self.sequential_ms

    @property
    def ideal_reduction(self) -> float:
        """1 - depth / layers: the critical-path ideal, counting decoder layers only."""
        return 1 - self.plan.depth / self.plan.num_layers

    def to_dict(self) -> dict:
        return {"sequential_ms": round(self.sequential_ms, 4), "plan_ms": round(self.plan_ms, 4),
                "latency_reduction": round(self.latency_reduction, 4),
                "speedup": round(self.sequential_ms / self.plan_ms, 4),
                "ideal_reduction": round(self.ideal_reduction, 4),
                "breakdown": {"sequential": self.sequential.to_dict(), "plan": self.planned.to_dict()},
                "hardware": self.hardware.to_dict(), "dtype": self.dtype, "batch": self.batch,
                "context": self.context, "plan": self.plan.to_dict()}


def estimate(cfg: ModelConfig, plan: Plan, hw: Hardware, batch: int = 1, context: int = DEFAULT_CONTEXT,
             dtype: str | None = None) -> Estimate:
    """Decode latency of `cfg` as one sequential model and under `plan`, on `hw`.

    `context`: tokens already in the KV cache (each step reads them); `dtype`: the engine's
    (None or 'auto': the checkpoint's, as `cqil-compile --dtype auto`).
    """
    if plan.num_layers != cfg.num_layers:
        raise CqilError(f"estimate: the plan is for {plan.num_layers} layers, the model has {cfg.num_layers}")
    if not (isinstance(batch, int) and batch >= 1):
        raise CqilError(f"estimate: batch must be an integer >= 1, got {batch!r}")
    if not (isinstance(context, int) and context >= 0):
        raise CqilError(f"estimate: context must be an integer >= 0, got {context!r}")
    dtype = engine_dtype(cfg, dtype)
    nbytes = DTYPE_BYTES[dtype]
    layer = layer_work(cfg, batch, context, nbytes)
    ends = (embed_work(cfg, batch, nbytes), head_work(cfg, batch, nbytes))

    seq = Breakdown(host_us=hw.step_us)
    for w in (*ends, *[layer] * cfg.num_layers):
        seq.add(*_run(hw, w))

    planned = Breakdown(host_us=hw.step_us)
    for w in (*ends, *[layer] * (len(plan.prefix) + len(plan.suffix))):
        planned.add(*_run(hw, w))
    for group in plan.groups:  # a member with bypass sources adds their attention outputs: one add each
        members = [layer_work(cfg, batch, context, nbytes, extra_kernels=len(plan.bypass_sources(i)))
                   for i in range(len(group))]
        planned.add(*_concurrent(hw, members))
    message = batch * cfg.hidden_size * nbytes  # [B, 1, H] per rank
    for name in plan.collectives():
        planned.collective_us += collective_us(hw, name.split("[")[0], plan.p, message)
    return Estimate(plan, hw, dtype, batch, context, seq, planned)


# -- --p auto --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Candidate:
    plan: Plan
    source: str
    estimate: Estimate


def auto_candidates(cfg: ModelConfig, hw: Hardware, start: int | None = None, end: int | None = None,
                    bypass: int | None = None, semantics: str | None = None, replicate_outer: bool = False,
                    **kwargs) -> list[Candidate]:
    """Plans worth trying, fastest predicted first: per p in AUTO_P, the default range (or the given
    --start/--end fitted to p), and the checkpoint's own plan (`cqil_layers`) if it has one.

    Ranges are not widened beyond these: predicted latency only falls as a range grows, and what
    bounds a range is quality (cqil-analyze suggests one from layer-input similarity), which this
    model does not see.
    """
    tried: dict[Plan, str] = {}
    flags = dict(bypass=bypass, semantics=semantics, replicate_outer=replicate_outer)
    if "cqil_layers" in cfg.extra and start is None and end is None:
        plan, source = resolve_plan(cfg.num_layers, authors=cfg.extra, **flags)
        tried[plan] = source
    for p in AUTO_P:
        if p > cfg.num_layers or (bypass or 0) >= p:
            continue
        try:
            plan, source = resolve_plan(cfg.num_layers, p=p, start=start, end=end, **flags)
        except CqilError:  # no group of p layers fits that range
            continue
        tried.setdefault(plan, source)
    if not tried:
        raise CqilError(f"--p auto: no p in {', '.join(map(str, AUTO_P))} puts a group in the range "
                        f"of this {cfg.num_layers}-layer model")
    out = [Candidate(plan, source, estimate(cfg, plan, hw, **kwargs)) for plan, source in tried.items()]
    return sorted(out, key=lambda c: (c.estimate.plan_ms, c.plan.p))


# -- text ------------------------------------------------------------------------------------------

def format_estimate(e: Estimate) -> str:
    hw = e.hardware
    lines = [f"latency estimate, decode ms/token on {hw.name} ({hw.description}); {e.dtype}, batch {e.batch}, "
             f"context {e.context}:",
             f"  {'':<26}{'sequential':>12}{'plan':>10}"]
    rows = [("weights + KV read", "weights_kv_us"), ("kernel launches", "launch_us"),
            ("collectives", "collective_us"), ("host (per step)", "host_us"), ("total", "total_us")]
    for label, attr in rows:
        lines.append(f"  {label:<26}{getattr(e.sequential, attr) / 1e3:>12.3f}{getattr(e.planned, attr) / 1e3:>10.3f}")
    lines.append(f"  latency reduction {e.latency_reduction:.1%} (speedup {e.sequential_ms / e.plan_ms:.2f}x); "
                 f"critical-path ideal {e.ideal_reduction:.1%} (depth {e.plan.num_layers} -> {e.plan.depth})")
    ar = ", ".join(f"p={p} {us:g}" for p, us in hw.allreduce_us)
    lines.append(f"  profile: {hw.memory_gbs:g} GB/s, {hw.peak_tflops:g} TFLOP/s, launch {hw.launch_us:g} us, "
                 f"all-reduce us {ar}" + (", ranks share one memory bus" if hw.shared_memory else ""))
    return "\n".join(lines)


def format_candidates(candidates: list[Candidate]) -> str:
    lines = ["--p auto: candidates, best predicted first",
             f"  {'p':>2}  {'range':<10}{'d':>2}{'depth':>7}{'plan ms':>10}{'reduction':>11}  source"]
    for c in candidates:
        e = c.estimate
        lines.append(f"  {c.plan.p:>2}  {f'[{c.plan.start}, {c.plan.end})':<10}{c.plan.bypass:>2}{c.plan.depth:>7}"
                     f"{e.plan_ms:>10.3f}{e.latency_reduction:>11.1%}  {c.source}")
    best = candidates[0].estimate
    if best.latency_reduction <= 0:
        lines.append(f"  none is predicted faster than the sequential model ({best.sequential_ms:.3f} ms) on "
                     f"{best.hardware.name}: p=1 is the better choice there")
    return "\n".join(lines)
