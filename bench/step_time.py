"""Training-step time on CPU for the same trained span: torch (eager) vs ONNX Runtime training vs
ExecuTorch (portable kernels, and XNNPACK-delegated).

Builds a mid-size FLUX-like transformer in-process (random weights, seeded; ~63M parameters), exports
bundles for a plan that trains 2 of its 4 blocks (front skip 1, back skip 1) with LoRA in float32 --
one with the torch, onnx and pte formats, one with pte lowered to XNNPACK -- precomputes a small cache
of random photos with the torch backend, then times optimizer steps (grad_accum 1) on the same cache
entries, loaded before timing, each backend exactly as its ``train()`` steps:

* torch: ``TrainedSpan`` + ``torch.optim.AdamW`` (loss, backward, step, zero_grad);
* ort: ``OrtTrainer.loss_and_grad`` + ``update`` (ORT training 1.19.2);
* executorch / executorch-xnnpack: ``EtTrainer.loss_and_grad`` + ``update`` (the program's
  forward-backward, then our AdamW on its weights).

``--streamed`` adds the block-streamed span of the same plan (float32 storage, so the same weights) on
each backend: ``runtime.stream.StreamedSpan`` over the torch / ORT / ExecuTorch block backends (a
forward sweep, the head program, a VJP sweep that recomputes each block, numpy AdamW), and the native
runner (its own log's step times), each next to the resident span with the ratio.

torch and ORT get the same intra-op thread count; the ExecuTorch Python runtime uses its own
threadpool. Prints the setup, the losses (all start from the same LoRA and see the same entries, so
they agree) and a markdown table.

    python -m bench.step_time                      # ~3-4 min on 2 cores (exports dominate)
    python -m bench.step_time --backends torch,ort --steps 50
    python -m bench.step_time --streamed           # + the block-streamed rows (~8 min)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

MODEL = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=2,
    attention_head_dim=64,
    num_attention_heads=12,
    joint_attention_dim=256,
    pooled_projection_dim=128,
    guidance_embeds=False,
    axes_dims_rope=(16, 24, 24),
)
PROMPT = "a photo of sks"


def write_photos(folder: Path, n: int, size: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        Image.fromarray((rng.random((size, size, 3)) * 255).astype("uint8")).save(folder / f"photo_{i}.png")
    return folder


def build(work: Path, a) -> tuple[Path, Path, int]:
    """Export the bundle (torch + onnx) and precompute its cache; returns (bundle, cache, model params)."""
    import torch
    from diffusers import FluxTransformer2DModel

    from blockskip.device_train.app import run_precompute
    from blockskip.export.bundle_writer import export_bundle
    from blockskip.export.families import wrap_model
    from blockskip.export.onnx_export import native_stderr_captured
    from blockskip.runtime.plan import Plan
    from blockskip.runtime.profiles import load_profile

    torch.manual_seed(0)
    lm = wrap_model(FluxTransformer2DModel(**MODEL), name="bench-flux", vae_factor=4)
    n_params = sum(p.numel() for p in lm.transformer.parameters())
    plan = Plan(
        front_skip=1,
        back_skip=1,
        s_min=a.s_min,
        s_max=a.s_max,
        num_samples=a.samples,
        lora_rank=a.rank,
        dtype="float32",
        steps=a.warmup + a.steps,
        grad_accum=1,
    )
    bundle, cache = work / "bundle", work / "cache"
    t0 = time.perf_counter()
    formats = (
        ["torch"]
        + (["onnx"] if "ort" in a.backends else [])
        + (["pte"] if "executorch" in a.backends else [])
    )
    with native_stderr_captured():  # the export's own capture covers ORT; this one the rest
        export_bundle(lm, plan, load_profile("desktop-cpu"), PROMPT, bundle, formats=formats)
        print(f"export ({' + '.join(formats)}): {time.perf_counter() - t0:.1f} s", flush=True)
        if "executorch-xnnpack" in a.backends:
            t0 = time.perf_counter()
            export_bundle(
                lm,
                plan,
                load_profile("desktop-cpu"),
                PROMPT,
                work / "bundle-xnnpack",
                formats=["pte"],
                delegate="xnnpack",
            )
            print(f"export (pte, XNNPACK): {time.perf_counter() - t0:.1f} s", flush=True)
        if a.streamed:
            import dataclasses

            t0 = time.perf_counter()
            sp = dataclasses.replace(plan, span="streamed", storage="float32")
            sfmt = [f for f in formats if f in ("torch", "onnx", "pte")]
            export_bundle(lm, sp, load_profile("desktop-cpu"), PROMPT, work / "bundle-streamed", formats=sfmt)
            print(f"export (streamed: {' + '.join(sfmt)}): {time.perf_counter() - t0:.1f} s", flush=True)
            if "executorch-xnnpack" in a.backends:
                export_bundle(
                    lm,
                    sp,
                    load_profile("desktop-cpu"),
                    PROMPT,
                    work / "bundle-streamed-xnnpack",
                    formats=["pte"],
                    delegate="xnnpack",
                )
    del lm
    t0 = time.perf_counter()
    photos = write_photos(work / "photos", 3, a.s_max)
    run_precompute(bundle, photos, cache, backend="torch", quiet=True)
    print(f"precompute ({a.samples} entries, torch backend): {time.perf_counter() - t0:.1f} s", flush=True)
    if a.streamed:
        run_precompute(work / "bundle-streamed", photos, work / "cache-streamed", backend="torch", quiet=True)
        if "executorch-xnnpack" in a.backends:
            run_precompute(
                work / "bundle-streamed-xnnpack",
                photos,
                work / "cache-streamed-xnnpack",
                backend="executorch",
                quiet=True,
            )
    return bundle, cache, n_params


def time_steps(step, entries: list, warmup: int, steps: int) -> tuple[list[float], list[float]]:
    """Run ``warmup + steps`` steps over ``entries`` in cache order; returns (losses, timed seconds)."""
    losses, secs = [], []
    for s in range(warmup + steps):
        t0 = time.perf_counter()
        losses.append(step(entries[s % len(entries)]))
        dt = time.perf_counter() - t0
        if s >= warmup:
            secs.append(dt)
    return losses, secs


def bench_torch(bundle_dir: Path, cache_dir: Path, a) -> dict:
    from safetensors.torch import load_file

    from blockskip.runtime.backends.torch import TrainedSpan, make_optimizer
    from blockskip.runtime.backends.torch_io import BlockStore
    from blockskip.runtime.bundle import Bundle
    from blockskip.runtime.cache import ResidualCache

    bundle = Bundle(bundle_dir)
    plan = bundle.plan
    cache = ResidualCache(cache_dir)
    entries = [load_file(cache.path(k)) for k in range(len(cache.schedule))]
    span = TrainedSpan(
        BlockStore(bundle), bundle.trained, bundle.manifest["lora"], plan.seed, base_quant=plan.base_quant
    )
    opt = make_optimizer(span.params, plan)
    lora_ids = {id(p) for p in span.params}
    base = sum(
        p.numel() for p in span.model.parameters() if p.device.type != "meta" and id(p) not in lora_ids
    )

    def step(entry):
        loss = span.loss(entry)
        loss.backward()
        total = loss.item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return total

    losses, secs = time_steps(step, entries, a.warmup, a.steps)
    e = entries[0]
    return {
        "losses": losses,
        "secs": secs,
        "base": base,
        "lora": sum(p.numel() for p in span.params),
        "img_tokens": e["in.hidden"].shape[1],
        "txt_tokens": e["in.encoder"].shape[1],
        "trained": bundle.trained,
    }


def bench_ort(bundle_dir: Path, cache_dir: Path, a) -> dict:
    from safetensors.numpy import load_file

    from blockskip.runtime.backends.ort import OrtTrainer
    from blockskip.runtime.bundle import Bundle
    from blockskip.runtime.cache import ResidualCache

    cache = ResidualCache(cache_dir)
    entries = [load_file(cache.path(k)) for k in range(len(cache.schedule))]
    trainer = OrtTrainer(Bundle(bundle_dir), threads=a.threads)

    def step(entry):
        loss = trainer.loss_and_grad(entry, 1.0)
        trainer.update()
        return loss

    losses, secs = time_steps(step, entries, a.warmup, a.steps)
    return {"losses": losses, "secs": secs, "lora": sum(v.size for v in trainer.lora().values())}


def bench_executorch(bundle_dir: Path, cache_dir: Path, a) -> dict:
    from safetensors.torch import load_file

    from blockskip.runtime.backends.executorch import EtTrainer
    from blockskip.runtime.bundle import Bundle
    from blockskip.runtime.cache import ResidualCache

    cache = ResidualCache(cache_dir)
    entries = [load_file(cache.path(k)) for k in range(len(cache.schedule))]
    trainer = EtTrainer(Bundle(bundle_dir))

    def step(entry):
        loss = trainer.loss_and_grad(entry, 1.0)
        trainer.update()
        return loss

    losses, secs = time_steps(step, entries, a.warmup, a.steps)
    return {"losses": losses, "secs": secs, "lora": sum(v.size for v in trainer.lora().values())}


def bench_streamed(name: str, bundle_dir: Path, cache_dir: Path, a) -> dict:
    """The streamed span on a block backend, stepped as the driver steps it."""
    from blockskip.runtime.bundle import Bundle
    from blockskip.runtime.cache import ResidualCache
    from blockskip.runtime.stream import StreamedSpan

    bundle = Bundle(bundle_dir)
    if name == "torch":
        from blockskip.runtime.backends.torch import TorchBlocks as B
    elif name == "ort":
        from blockskip.runtime.backends.ort import OrtPrograms as B
    else:
        from blockskip.runtime.backends.executorch import EtPrograms as B
    cache = ResidualCache(cache_dir)
    span = StreamedSpan(bundle, B(bundle))
    entries = [span.load_entry(cache.path(k)) for k in range(len(cache.schedule))]

    def step(entry):
        loss = span.loss_and_grad(entry, 1.0)
        span.update()
        return loss

    try:
        losses, secs = time_steps(step, entries, a.warmup, a.steps)
    finally:
        span.close()
    return {"losses": losses, "secs": secs, "lora": sum(v.size for v in span.lora().values())}


def bench_native(bundle_dir: Path, cache_dir: Path, work: Path, a) -> dict | None:
    """The native runner's own step times (its train_log.json) on the streamed pte bundle."""
    import json
    import os
    import subprocess

    exe = (
        Path(__file__).resolve().parents[1]
        / "build"
        / "native"
        / "device_train"
        / "native"
        / "blockskip-train-native"
    )
    if not (exe.is_file() and os.access(exe, os.X_OK)):
        print("native runner not built (make native): no native row", flush=True)
        return None
    out = work / "native-out"
    r = subprocess.run(
        [str(exe), str(bundle_dir), "--cache", str(cache_dir), "-o", str(out), "--quiet"],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise RuntimeError(f"native runner failed:\n{r.stderr}")
    log = json.loads((out / "train_log.json").read_text())
    return {"losses": log["losses"], "secs": log["step_seconds"][a.warmup :], "lora": 0}


BACKENDS = ("torch", "ort", "executorch", "executorch-xnnpack")
LABELS = {
    "torch": "torch (eager, AdamW)",
    "ort": "ort (ORT training 1.19.2)",
    "executorch": "executorch (portable kernels)",
    "executorch-xnnpack": "executorch (XNNPACK)",
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="timed optimizer steps per backend (default 20)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    ap.add_argument(
        "--threads",
        type=int,
        default=0,
        help="intra-op threads for both backends (default: torch.get_num_threads())",
    )
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    ap.add_argument(
        "--s-min", type=int, default=128, help="training crop side in px (default 128: 256 image tokens)"
    )
    ap.add_argument("--s-max", type=int, default=256, help="photo side in px (default 256)")
    ap.add_argument("--samples", type=int, default=4, help="cache entries (default 4)")
    ap.add_argument(
        "--backends",
        default=",".join(BACKENDS),
        help=f"comma-separated, from {', '.join(BACKENDS)} (torch is always the reference)",
    )
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep the bundle and cache there")
    ap.add_argument("--streamed", action="store_true", help="add the block-streamed span on every backend")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 0:
        ap.error("--steps must be >= 1 and --warmup >= 0")
    a.backends = ["torch"] + [b for b in a.backends.split(",") if b.strip() and b.strip() != "torch"]
    bad = [b for b in a.backends if b not in BACKENDS]
    if bad:
        ap.error(f"unknown backends {bad}; choose from {', '.join(BACKENDS)}")

    import torch

    t_start = time.perf_counter()
    a.threads = a.threads or torch.get_num_threads()
    torch.set_num_threads(a.threads)
    tmp = None
    if a.keep:
        work = Path(a.keep)
        if work.exists() and any(work.iterdir()):
            ap.error(f"--keep {work} exists and is not empty")
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="step_time.")
        work = Path(tmp)
    try:
        bundle, cache, n_params = build(work, a)
        results = {"torch": bench_torch(bundle, cache, a)}
        if "ort" in a.backends:
            results["ort"] = bench_ort(bundle, cache, a)
        if "executorch" in a.backends:
            results["executorch"] = bench_executorch(bundle, cache, a)
        if "executorch-xnnpack" in a.backends:
            results["executorch-xnnpack"] = bench_executorch(work / "bundle-xnnpack", cache, a)
        if a.streamed:
            sb, sc = work / "bundle-streamed", work / "cache-streamed"
            for name in a.backends:
                if name == "executorch-xnnpack":
                    results[name + " streamed"] = bench_streamed(
                        name, work / "bundle-streamed-xnnpack", work / "cache-streamed-xnnpack", a
                    )
                else:
                    results[name + " streamed"] = bench_streamed(name, sb, sc, a)
            if "executorch" in a.backends:
                nat = bench_native(sb, sc, work, a)
                if nat is not None:
                    results["native streamed"] = nat
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    t = results["torch"]
    print(f"threads: {a.threads} (torch intra-op = ORT intra-op)")
    print(f"model: FLUX-like, {n_params / 1e6:.1f}M parameters, 4 blocks; trained blocks {t['trained']}")
    print(
        f"trained span: {t['base'] / 1e6:.1f}M frozen base parameters (trained blocks + head), "
        f"{t['lora'] / 1e6:.2f}M LoRA parameters (rank {a.rank})"
    )
    print(
        f"tokens per step: {t['img_tokens']} image + {t['txt_tokens']} text ({a.s_min} px crops), float32, "
        "grad_accum 1"
    )
    for name, r in results.items():
        if name != "torch":
            print(
                f"{name}: loss step 1 {r['losses'][0]:.6f} vs torch "
                f"{t['losses'][0]:.6f} (rel diff {abs(r['losses'][0] / t['losses'][0] - 1):.1e}), step "
                f"{len(r['losses'])} rel diff {abs(r['losses'][-1] / t['losses'][-1] - 1):.1e}"
            )
    print(f"\n{a.steps} timed steps after {a.warmup} warm-up steps:\n")
    print(
        "| backend | span | median ms/step | mean ms/step | speed vs torch resident | streamed vs resident |"
    )
    print("|---|---|---|---|---|---|")
    ref = statistics.median(t["secs"])
    for name, r in results.items():
        base, _, streamed = name.partition(" ")
        med, mean = statistics.median(r["secs"]), statistics.fmean(r["secs"])
        res = results.get(base if base != "native" else "executorch")
        ratio = f"{statistics.median(res['secs']) / med:.2f}x" if streamed and res else ""
        label = LABELS.get(base, "native runner (C++, portable kernels)")
        print(
            f"| {label} | {'streamed' if streamed else 'resident'} | {med * 1e3:.1f} | {mean * 1e3:.1f} | "
            f"{ref / med:.2f}x | {ratio} |"
        )
    if a.keep:
        print(f"\nbundle and cache kept in {work}")
    print(f"\n({time.perf_counter() - t_start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
