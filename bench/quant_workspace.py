"""Measure the hidden workspace of quantised linears (optimum-quanto) per weight element.

quanto's kernels dequantise / unpack a weight inside one op; those buffers never pass torch's
dispatcher, so the dry run cannot see them and adds ``max weight numel x bytes-per-element`` from the
table this script prints (``QUANT_WORKSPACE`` in export/memory/dryrun.py).

    python -m bench.quant_workspace
"""

from __future__ import annotations

import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn
from torch.profiler import ProfilerActivity, profile

from blockskip.export.memory.tracer import MemoryTracer
from blockskip.runtime.backends.torch_quant import quantize_frozen


def allocator_peak(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
        key=lambda e: e.start_ns(),
    )
    cur = peak = 0
    for e in events:
        cur += e.nbytes()
        peak = max(peak, cur)
    return peak


def main() -> int:
    print("| dtype | base | weight | hidden bytes per weight element |")
    print("|---|---|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        for mode in ("int8", "nf4"):
            for i, o in ((1280, 256), (3072, 3072), (3072, 12288)):
                root = nn.Module()
                root.blk = nn.Sequential(nn.Linear(i, o, dtype=dtype))
                root.requires_grad_(False)
                quantize_frozen(root, ["blk"], mode, ["blk.0"])
                inject_adapter_in_model(LoraConfig(r=4, target_modules=["blk.0"]), root)
                x = torch.randn(1, 64, i, dtype=dtype, requires_grad=True)

                def run(root=root, x=x):
                    root.blk(x).float().sum().backward()

                run()
                tr = MemoryTracer()
                with tr:
                    run()
                extra = allocator_peak(run) - tr.peak
                print(
                    f"| {str(dtype).split('.')[-1]} | {mode} | {o}x{i} | {extra / (i * o):.2f} |", flush=True
                )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
