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

import torch

Cost = Counter  # (dtype name, flops, bytes) -> number of ops

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


_EXTRA = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_cpu_backward_flops,
}


def _registry():
    from torch.utils.flop_counter import flop_registry

    return flop_registry


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


def scaled(cost: Cost, factor: float) -> dict:
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
        self.cost[op_cost(func, args, kwargs, out)] += 1
        return out


def calibrate(seconds_each: float = 1.0, log=lambda msg: None) -> dict:
    """This machine's figures, measured with torch in a few seconds: dense matmul GFLOP/s per dtype
    (512 x 3072 by 3072 x 3072, torch's threads), copy bandwidth (GB/s, bytes read + written), and the
    per-op overhead of eager torch in a training step (a small LoRA-wrapped transformer's forward and
    backward, time per dispatched op); each from the fastest of repeated calls."""
    import time

    def rate(fn, work: float) -> float:
        """``work`` per second of the fastest call: other processes sharing the cores only slow calls
        down, so the fastest is the machine's own figure (``bench.time_accuracy`` times steps alike)."""
        fn()  # warm up
        times, t0 = [], time.perf_counter()
        while time.perf_counter() - t0 < seconds_each or len(times) < 3:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return work / min(times)

    out: dict = {"throughput": {"cpu": {}}}
    m, n = 512, 3072  # a transformer's linear: 512 tokens, width 3072
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        a, b = torch.randn(m, n).to(dt), torch.randn(n, n).to(dt)
        name = str(dt).removeprefix("torch.")
        if dt == torch.float16:  # emulated on most CPUs: orders of magnitude slower; one small call
            a, b = a[:64, :512], b[:512, :512]
            out["throughput"]["cpu"][name] = round(rate(lambda a=a, b=b: a @ b, 2 * 64 * 512 * 512) / 1e9, 2)
        else:
            out["throughput"]["cpu"][name] = round(rate(lambda a=a, b=b: a @ b, 2 * m * n * n) / 1e9, 1)
        log(f"  matmul {name}: {out['throughput']['cpu'][name]} GFLOP/s")
    src = torch.randn(64 << 20)  # 256 MiB
    dst = torch.empty_like(src)
    out["bandwidth_gbs"] = round(rate(lambda: dst.copy_(src), 2 * src.numel() * 4) / 1e9, 1)
    log(f"  copy: {out['bandwidth_gbs']} GB/s")
    step = _tiny_training_step()
    counter = CostCounter()
    with counter:
        step()
    ops = sum(counter.cost.values())
    out["op_overhead_us"] = {"torch": round(1e6 / rate(step, ops), 2)}
    log(
        f"  eager torch: {out['op_overhead_us']['torch']} us per op (a LoRA training step of a small "
        f"FLUX transformer: {ops} ops)"
    )
    return out


def _tiny_training_step():
    """A training step of the kind the torch backend runs, so small that its time is all per-op
    overhead: a two-block FLUX transformer (diffusers) with peft LoRA, forward, loss and backward."""
    from diffusers import FluxTransformer2DModel

    from blockskip.runtime.backends.torch_lora import inject_lora, lora_parameters

    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        patch_size=1,
        in_channels=8,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )
    names = [
        n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "transformer_blocks" in n
    ]
    inject_lora(model, {"rank": 4, "alpha": 4.0, "targets": names})
    params = lora_parameters(model)
    hidden, text = torch.randn(1, 16, 8), torch.randn(1, 4, 16)
    img_ids = torch.zeros(16, 3)
    txt_ids = torch.zeros(4, 3)

    def step():
        out = model(
            hidden_states=hidden,
            encoder_hidden_states=text,
            pooled_projections=torch.zeros(1, 8),
            timestep=torch.ones(1),
            img_ids=img_ids,
            txt_ids=txt_ids,
            return_dict=False,
        )[0]
        out.square().mean().backward()
        for p in params:
            p.grad = None

    return step
