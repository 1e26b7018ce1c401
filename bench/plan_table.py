"""The README's dry-run table: peak memory of a training step for full-size models (no weights needed).

    python -m bench.plan_table            # prints a markdown table (about a minute)

Rows: plain LoRA at full resolution (all blocks loaded, with and without activation checkpointing)
and BlockSkip plans (the paper's FLUX splits 30% / 50% at s_max/2, with and without a 4-bit frozen
base). bf16 weights, LoRA rank 16 on the attention and MLP linears of trained blocks, batch 1, tensor
bytes only (a device profile adds its fixed overheads on top).
"""

from __future__ import annotations

import sys
import time

MODELS = ("flux-dev", "sd35-medium", "sana-1.6b")


def rows(model: str):
    from blockskip.export.memory.search import evaluate, split_for
    from blockskip.export.memory.specs import load_spec
    from blockskip.runtime.plan import Plan

    spec, d = load_spec(model)
    L = spec.family.num_blocks
    s_max = d["s_max"]
    base = dict(s_max=s_max, dtype="bfloat16", num_samples=1, lora_rank=16)
    plans = [("LoRA", dict(s_min=s_max, patch_sampling=False)),
             ("LoRA + checkpointing", dict(s_min=s_max, patch_sampling=False, checkpointing=True))]
    for r in (0.3, 0.5):
        n, m = split_for(L, r)
        for q in ("none", "nf4"):
            label = f"BlockSkip {int(r * 100)}% (n={n}, m={m})" + (", 4-bit base" if q == "nf4" else "")
            plans.append((label, dict(front_skip=n, back_skip=m, s_min=s_max // 2, base_quant=q)))
    for label, kw in plans:
        c = evaluate(spec, Plan(**base, **kw), None, num_images=1)
        pre, train = c.reports[0], c.reports[1]
        res = kw["s_min"]
        yield model, label, res, train.tensors, train.tensor_peak, pre.tensor_peak


def main() -> int:
    t0 = time.time()
    g = 2**30
    print("| model | plan | train px | span base | LoRA+grads+optim | activations | train peak (GiB) "
          "| precompute peak (GiB) |")
    print("|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        for model_, label, res, t, peak, pre in rows(model):
            small = t["lora"] + t["gradients"] + t["optimizer"]
            print(f"| {model_} | {label} | {res} | {t['trained_base'] / g:.2f} | {small / g:.2f} | "
                  f"{t['activations'] / g:.2f} | **{peak / g:.2f}** | {pre / g:.2f} |", flush=True)
    print(f"\n({time.time() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
