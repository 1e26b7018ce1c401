"""Time prediction from the dry run's own traces: FLOPs and bytes moved per op, and a roofline per profile.

The tracer (``MemoryTracer``) sees every op the device code runs on fake tensors; with ``cost`` on it
records each op as (dtype, FLOPs, bytes moved) in a ``Counter``. Matmuls, convolutions and attention
count their multiply-adds (torch's ``flop_counter`` formulas, and the CPU flash attention's here);
every other op counts one FLOP per output element. Bytes moved are the op's inputs and outputs; views
move none. A phase's time on a profile is the sum over its ops of

    max(FLOPs / throughput[engine][dtype], bytes / bandwidth) + per-op overhead[runtime]

(a roofline per op), plus what the phase reads from storage at the profile's read rate. The figures
come from the profile (``[compute.throughput]``, ``[compute.op_overhead_us]``, ``memory.bandwidth_gbs``,
``storage.read_mbs``); ``blockskip-plan --calibrate`` measures them on this machine.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping

import torch

Cost = Counter  # (dtype name, flops, bytes) -> number of ops

#: changes with what an op counts (memoised program costs of an earlier counting are not reused)
COUNTING = "no-prim-1"

_aten = torch.ops.aten


def _numel(t) -> int:
    return math.prod(t.shape) if isinstance(t, torch.Tensor) else 0


def _sdpa_cpu_flops(q, k, v, *args, **kwargs) -> int:
    # q [B, H, L, E], k [B, H, S, E], v [B, H, S, Ev]: QK^T and PV, a multiply-add each
    b, h, lq, e = q.shape[-4:] if q.dim() == 4 else (1, *q.shape[-3:])
    s, ev = k.shape[-2], v.shape[-1]
    return 2 * b * h * lq * s * (e + ev)


def _sdpa_cpu_backward_flops(grad_out, q, k, v, *args, **kwargs) -> int:
    # the flash backward recomputes QK^T, then dP = dO V^T, dV = P^T dO, dQ = dS K, dK = dS^T Q
    return int(_sdpa_cpu_flops(q, k, v) * 2.5)


_EXTRA: dict[object, Callable[..., int]] = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def _registry():
    from torch.utils.flop_counter import flop_registry

    return flop_registry


def counted(func) -> bool:
    """Whether ``func`` is an op the device runs: ``prim`` ops (a fake tensor's ``device`` and ``layout``
    queries, thousands a step) are dispatched only while tracing."""
    return getattr(func, "namespace", "aten") != "prim"


def op_cost(func, args, kwargs, out) -> tuple[str, int, int]:
    """(dtype, FLOPs, bytes moved) of one op."""
    from torch.utils._pytree import tree_flatten

    ins = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
    floats = [t for t in ins + outs if t.is_floating_point()]
    dtype = str((floats[0] if floats else (outs or ins or [torch.empty(())])[0]).dtype).removeprefix("torch.")
    if getattr(func, "is_view", False) or func in (
        _aten.detach.default,
        _aten.alias.default,
        _aten._unsafe_view.default,
        _aten.lift_fresh.default,
    ):
        return dtype, 0, 0
    nbytes = sum(_numel(t) * t.element_size() for t in ins + outs)
    packet = func.overloadpacket
    extra = _EXTRA.get(packet) or _EXTRA.get(func)
    reg = _registry()
    if extra is not None:
        flops = extra(*args, **(kwargs or {}))
    elif packet in reg:
        flops = reg[packet](*args, **(kwargs or {}), out_val=out)
    else:
        flops = sum(_numel(t) for t in outs)
    return dtype, int(flops), int(nbytes)


def combine(base: Cost, steps: list[tuple[Cost, int]]) -> Cost:
    """base + sum(k * (variant - base)), op kind by op kind (the composed trace's costs)."""
    out: Counter = Counter()
    keys = set(base).union(*(v for v, _ in steps))
    for key in keys:
        n = base.get(key, 0) + sum(k * (v.get(key, 0) - base.get(key, 0)) for v, k in steps)
        if n:
            out[key] = n
    return out


def scaled(cost: Mapping, factor: float) -> dict:
    """``cost`` with every count multiplied (a fraction: per sample of a chunk)."""
    return {k: v * factor for k, v in cost.items()}


def engine_for(fmt: str, profile) -> str:
    """The engine a plan's backend computes on: torch on a CUDA profile the GPU, else the CPU (the
    program formats run XNNPACK / ONNX Runtime's CPU kernels)."""
    return "gpu" if fmt == "torch" and "torch-cuda" in getattr(profile, "backends", ()) else "cpu"


def seconds(cost, profile, engine: str, runtime: str) -> float:
    """The roofline time of the ops in ``cost`` on ``profile``'s ``engine``; ``runtime`` ("torch": eager
    ops, "program": a runtime executing a lowered graph) picks the per-op overhead."""
    if not cost:
        return 0.0
    rates = profile.throughput.get(engine) or {}
    default = rates.get("float32") or max(rates.values(), default=0.0)
    bw = profile.bandwidth_gbs * 1e9
    overhead = profile.op_overhead_us.get(runtime, 0.0) * 1e-6
    total = 0.0
    for (dtype, flops, nbytes), n in cost.items():
        rate = (rates.get(dtype) or default) * 1e9
        t = max(flops / rate if rate else 0.0, nbytes / bw if bw else 0.0)
        total += n * (t + overhead)
    return total


def read_seconds(nbytes: float, profile) -> float:
    """Reading ``nbytes`` from storage at the profile's sequential read rate."""
    rate = getattr(profile, "storage_read_mbs", 0.0) * 1e6
    return nbytes / rate if rate else 0.0


class CostCounter(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts every op's cost (``op_cost``) while code runs, e.g. a program's graph on fake inputs."""

    def __init__(self):
        super().__init__()
        self.cost: Cost = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if counted(func):
            self.cost[op_cost(func, args, kwargs, out)] += 1
        return out


def _fastest(fn, seconds_each: float = 1.0) -> float:
    """The fastest call of ``fn``, in windows of ``seconds_each`` until a window brings no gain: other
    processes sharing the cores only slow calls down, and the first seconds of a training step's calls
    can run at half speed (caches, the allocator, clocks)."""
    import time

    fn()
    best = float("inf")
    for _ in range(8):
        times: list[float] = []
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds_each or len(times) < 3:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        if min(times) > 0.97 * best:
            return min(best, min(times))
        best = min(best, min(times))
    return best


def calibrate(seconds_each: float = 1.0, log=lambda msg: None) -> dict:
    """This machine's figures, measured with torch in a few seconds, each from the fastest of repeated
    calls (other processes sharing the cores only slow calls down):

    * copy bandwidth (GB/s, bytes read + written);
    * dense matmul GFLOP/s per dtype (512 x 3072 by 3072 x 3072, torch's threads): the peak;
    * what a training step sustains: two LoRA training steps of small FLUX transformers (diffusers, peft,
      forward, loss, backward and AdamW, as the torch backend runs them; ``SMALL_STEP``, ``LARGE_STEP``),
      one whose time is mostly per-op cost and one whose time is mostly matmuls. Their ops are counted as the dry run counts
      them, and the per-op overhead and the fraction of the peak that matmuls reach inside a step are
      solved for, so that ``seconds`` gives both steps' measured times.

    The throughput returned is the sustained one (the peak times that fraction); ``peak`` and
    ``efficiency`` say where it came from."""

    peak: dict = {}
    m, n = 512, 3072  # a transformer's linear: 512 tokens, width 3072
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        a, b = torch.randn(m, n).to(dt), torch.randn(n, n).to(dt)
        name = str(dt).removeprefix("torch.")
        if dt == torch.float16:  # emulated on most CPUs: orders of magnitude slower; one small call
            a, b = a[:64, :512], b[:512, :512]
            peak[name] = 2 * 64 * 512 * 512 / _fastest(lambda a=a, b=b: a @ b, seconds_each) / 1e9
        else:
            peak[name] = 2 * m * n * n / _fastest(lambda a=a, b=b: a @ b, seconds_each) / 1e9
        log(f"  matmul {name}: {peak[name]:.4g} GFLOP/s (peak)")
    src = torch.randn(64 << 20)  # 256 MiB
    dst = torch.empty_like(src)
    bandwidth = round(2 * src.numel() * 4 / _fastest(lambda: dst.copy_(src), seconds_each) / 1e9, 1)
    log(f"  copy: {bandwidth} GB/s")

    steps = []
    for dims in (SMALL_STEP, LARGE_STEP):
        step = _training_step(*dims)
        counter = CostCounter()
        with counter:
            step()
        steps.append((counter.cost, _fastest(step, seconds_each)))
    overhead, efficiency = fit_step_times(steps, peak, bandwidth)
    (small, t_small), (large, t_large) = steps
    log(
        f"  training steps: {sum(small.values())} ops in {t_small * 1e3:.2f} ms, {sum(large.values())} ops "
        f"in {t_large * 1e3:.1f} ms -> eager torch {overhead * 1e6:.2f} us per op, matmuls at "
        f"{efficiency:.0%} of the peak"
    )
    return {
        "bandwidth_gbs": bandwidth,
        "throughput": {"cpu": {k: round(v * efficiency, 2 if v < 10 else 1) for k, v in peak.items()}},
        "op_overhead_us": {"torch": round(overhead * 1e6, 2)},
        "peak": {"cpu": {k: round(v, 2 if v < 10 else 1) for k, v in peak.items()}},
        "efficiency": round(efficiency, 3),
    }


def fit_step_times(steps: list[tuple[Cost, float]], peak: dict, bandwidth_gbs: float) -> tuple[float, float]:
    """(per-op overhead in seconds, matmul efficiency) with which ``seconds`` predicts both measured
    steps: ``steps`` is [(ops, seconds)] of an overhead-bound step and a compute-bound one."""
    (small, t_small), (large, t_large) = steps

    def roofline(cost: Cost, eff: float) -> float:
        total = 0.0
        for (dtype, flops, nbytes), n in cost.items():
            rate = (peak.get(dtype) or peak["float32"]) * eff * 1e9
            total += n * max(flops / rate, nbytes / (bandwidth_gbs * 1e9))
        return total

    eff, overhead = 1.0, 0.0
    for _ in range(30):  # alternate: the overhead from the small step, the efficiency from the large one
        overhead = max(0.0, (t_small - roofline(small, eff)) / sum(small.values()))
        lo, hi = 0.02, 1.0
        for _ in range(40):  # roofline falls as eff grows: bisect for the large step's time
            mid = (lo + hi) / 2
            if sum(large.values()) * overhead + roofline(large, mid) > t_large:
                lo = mid
            else:
                hi = mid
        eff = (lo + hi) / 2
    return overhead, eff


#: the calibration's training steps (heads, head dim, image tokens, text tokens, LoRA rank): a small one
#: whose time is mostly per-op cost and a large one whose time is mostly matmuls. The small one's ops are
#: still large enough to run on all of torch's threads (its MLP: 128 x 1024 elements), as a small model's
#: are: waking the threads for each op is part of what an op costs in a step (measured here: 3.7 us per op
#: with width 64, where no op is split across threads, 6.5 us with width 256)
SMALL_STEP = (4, 64, 128, 16, 4)
LARGE_STEP = (8, 64, 256, 32, 16)


def _training_step(heads: int, head_dim: int, tokens: int, text: int, rank: int):
    """A LoRA training step of the kind the torch backend runs, on a two-block FLUX transformer (diffusers,
    peft): forward, loss, backward and AdamW (``make_optimizer``'s), LoRA on every block linear."""
    from diffusers import FluxTransformer2DModel

    from blockskip.runtime.backends.torch_families.base import DiffusersModel
    from blockskip.runtime.backends.torch_lora import inject_lora, lora_parameters

    torch.manual_seed(0)
    model: DiffusersModel = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=head_dim,
        num_attention_heads=heads,
        joint_attention_dim=128,
        pooled_projection_dim=8,
        axes_dims_rope=(head_dim // 4, 3 * head_dim // 8, 3 * head_dim // 8),
    )
    model.requires_grad_(False)
    names = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks" in n
    ]
    inject_lora(model, {"rank": rank, "alpha": float(rank), "targets": names})
    params = lora_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4, foreach=False)  # as ``make_optimizer`` builds it
    hidden = torch.randn(1, tokens, model.config.in_channels)
    prompt = torch.randn(1, text, model.config.joint_attention_dim)
    img_ids, txt_ids = torch.zeros(tokens, 3), torch.zeros(text, 3)

    def step():
        out = model(
            hidden_states=hidden,
            encoder_hidden_states=prompt,
            pooled_projections=torch.zeros(1, 8),
            timestep=torch.ones(1),
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        out.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step
