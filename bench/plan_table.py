"""The README's dry-run table: peak memory of a training step for full-size models (no weights needed).

    python -m bench.plan_table            # prints a markdown table (about a minute)
    python -m bench.plan_table --streamed [MODEL ...]  # block-streamed plans on the phone profiles (~30 min)

Rows: plain LoRA at full resolution (all blocks loaded, with and without activation checkpointing)
and BlockSkip plans (the paper's FLUX splits 30% / 50% at s_max/2, with and without a 4-bit frozen
base). bf16 weights, LoRA rank 16 on the attention and MLP linears of trained blocks, batch 1, tensor
bytes only (a device profile adds its fixed overheads on top).

``--streamed``: block-streamed plans on the phone profiles, whole process (the profile's runtime,
slack and margin included) for each backend format, with the bundle's weight bytes per storage dtype;
a no-skip full-resolution streamed row (the MeBP-style baseline: streaming alone) next to BlockSkip's.
pte rows use the programs' planned ExecuTorch arenas, onnx rows the traced live peak.
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
    plans = [
        ("LoRA", dict(s_min=s_max, patch_sampling=False)),
        ("LoRA + checkpointing", dict(s_min=s_max, patch_sampling=False, checkpointing=True)),
    ]
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


STREAMED = {"flux-dev": "snapdragon8", "sd35-medium": "snapdragon8-gen2", "sana-1.6b": "snapdragon8-gen2"}


def streamed_rows(model: str):
    import dataclasses

    from blockskip.export.memory.search import evaluate, split_for
    from blockskip.export.memory.specs import load_spec
    from blockskip.export.memory.streamed import bundle_bytes
    from blockskip.runtime.plan import Plan
    from blockskip.runtime.profiles import load_profile

    spec, d = load_spec(model)
    profile = load_profile(STREAMED[model])
    L = spec.family.num_blocks
    s_max = d["s_max"]
    skel = spec.family.skeleton()
    memo: dict = {}
    plans = [("streaming alone (no skip)", dict(s_min=s_max, patch_sampling=False))]
    for r in (0.3, 0.5):
        n, m = split_for(L, r)
        plans.append(
            (f"BlockSkip {int(r * 100)}% (n={n}, m={m})", dict(front_skip=n, back_skip=m, s_min=s_max // 2))
        )
    for label, kw in plans:
        for storage in ("bfloat16", "int8", "int4"):
            plan = Plan(
                s_max=s_max,
                num_samples=1,
                lora_rank=16,
                span="streamed",
                storage=storage,
                vae_tiling=spec.encoder_spec["class"] == "AutoencoderDC",
                **kw,
            )
            size = bundle_bytes(spec, plan, skel)
            for fmt in ("pte", "onnx"):
                st = "float16" if (fmt == "onnx" and storage == "bfloat16") else storage
                c = evaluate(
                    spec,
                    dataclasses.replace(plan, storage=st),
                    profile,
                    memo=memo,
                    fmt=fmt,
                    exact=True,
                    skeleton=skel,
                )
                pre, train = c.reports[0], c.reports[1]
                yield (
                    model,
                    profile.name,
                    label,
                    kw["s_min"],
                    st,
                    fmt,
                    pre.peak,
                    train.peak,
                    c.fits,
                    size,
                    pre.extra["cache_entry_bytes"],
                )


def main_streamed() -> int:
    t0 = time.time()
    g = 2**30
    print(
        "| model | profile | plan | train px | storage | format | precompute (GiB) | train (GiB) | fits "
        "| bundle weights (GiB) | cache entry (MiB) |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    models = [m for m in STREAMED if not sys.argv[2:] or m in sys.argv[2:]]
    for model in models:
        for row in streamed_rows(model):
            model_, prof, label, res, st, fmt, pre, train, fits, size, entry = row
            print(
                f"| {model_} | {prof} | {label} | {res} | {st} | {fmt} | {pre / g:.2f} | **{train / g:.2f}** | "
                f"{'yes' if fits else 'no'} | {size / g:.2f} | {entry / 2**20:.1f} |",
                flush=True,
            )
    print(f"\n({time.time() - t0:.0f} s)", file=sys.stderr)
    return 0


def main() -> int:
    if "--streamed" in sys.argv[1:]:
        return main_streamed()
    t0 = time.time()
    g = 2**30
    print(
        "| model | plan | train px | span base | LoRA+grads+optim | activations | train peak (GiB) "
        "| precompute peak (GiB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model in MODELS:
        for model_, label, res, t, peak, pre in rows(model):
            small = t["lora"] + t["gradients"] + t["optimizer"]
            print(
                f"| {model_} | {label} | {res} | {t['trained_base'] / g:.2f} | {small / g:.2f} | "
                f"{t['activations'] / g:.2f} | **{peak / g:.2f}** | {pre / g:.2f} |",
                flush=True,
            )
    print(f"\n({time.time() - t0:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
