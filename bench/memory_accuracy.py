"""Dry-run accuracy: predicted vs measured training-step peak on a mid-size FLUX-like model.

Runs each plan for real on this CPU (export, precompute, two training steps) and prints the dry run's
prediction next to two measurements of step 2: the CPU allocator's events (torch.profiler) and the
RSS high-water mark (VmHWM after clear_refs, with malloc forced to return memory). Both are on top of
the bytes already live before the step (weights, LoRA, AdamW state, the cache entries).

    python -m bench.memory_accuracy            # ~320M parameters, 512 px; ~20 min on 2 cores
    python -m bench.memory_accuracy --small    # a quick run on a ~20M-parameter model
    python -m bench.memory_accuracy --streamed # block-streamed rows: native, executorch, ort (~15 min)

``--streamed``: the same model, BlockSkip 50% at s_max/2 with a block-streamed span (int8 storage), run
for real by each block-program backend (the native C++ runner, executorch, ort) in its own process. The
measurement is the whole process: its peak RSS (VmHWM) over training. The prediction is the dry run for
that backend's format plus the process's RSS when training starts (the runtime, measured: the
interpreter and libraries, which a profile's ``runtime_overhead_mib`` stands for on a device).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PLANS = {
    "LoRA full-res": dict(front_skip=0, back_skip=0, patch_sampling=False, half=False),
    "LoRA + checkpointing": dict(
        front_skip=0, back_skip=0, patch_sampling=False, half=False, checkpointing=True
    ),
    "BlockSkip 30% @ s_max/2": dict(ratio=0.3, half=True),
    "BlockSkip 50% @ s_max/2": dict(ratio=0.5, half=True),
    "BlockSkip 50% @ s_max/2, int8 base": dict(ratio=0.5, half=True, base_quant="int8"),
    "BlockSkip 50% @ s_max/2, int4 base": dict(ratio=0.5, half=True, base_quant="nf4"),
}


def model_config(small: bool) -> dict:
    if small:
        return dict(
            patch_size=1,
            in_channels=64,
            num_layers=2,
            num_single_layers=4,
            attention_head_dim=64,
            num_attention_heads=4,
            joint_attention_dim=256,
            pooled_projection_dim=128,
            guidance_embeds=False,
            axes_dims_rope=(16, 24, 24),
        )
    return dict(
        patch_size=1,
        in_channels=64,
        num_layers=8,
        num_single_layers=16,
        attention_head_dim=64,
        num_attention_heads=12,
        joint_attention_dim=768,
        pooled_projection_dim=256,
        guidance_embeds=False,
        axes_dims_rope=(16, 24, 24),
    )


def run_one(name: str, spec: dict, small: bool, work: Path, photos: Path) -> dict:
    import torch
    from diffusers import FluxTransformer2DModel

    from blockskip.device_train.app import run_precompute
    from blockskip.export.bundle_writer import export_bundle
    from blockskip.export.families import wrap_model
    from blockskip.export.memory.search import evaluate, split_for
    from blockskip.export.memory.specs import ModelSpec
    from blockskip.runtime.plan import Plan
    from blockskip.runtime.profiles import load_profile

    torch.manual_seed(0)
    # 8x latent mapping like a real VAE; 512 text tokens like FLUX's T5 at full size
    lm = wrap_model(
        FluxTransformer2DModel(**model_config(small)), vae_factor=8, text_tokens=64 if small else 512
    )
    s_max = 256 if small else 512
    spec = dict(spec)
    if "ratio" in spec:
        spec["front_skip"], spec["back_skip"] = split_for(lm.family.num_blocks, spec.pop("ratio"))
    half = spec.pop("half")
    plan = Plan(s_min=s_max // 2 if half else s_max, s_max=s_max, num_samples=2, lora_rank=16, **spec)
    prompt = lm.encode_prompt("a photo of sks")
    mspec = ModelSpec(
        lm.family, lm.encoder_spec, {k: tuple(v.shape) for k, v in prompt.items()}, lm.vae_factor
    )
    pred = evaluate(mspec, plan, None).reports[1].tensor_peak
    b, c = work / "bundle", work / "cache"
    shutil.rmtree(work, ignore_errors=True)
    export_bundle(lm, plan, load_profile("desktop-cpu"), "a photo of sks", b)
    del lm
    run_precompute(b, photos, c, quiet=True)
    out = {"plan": name, "predicted": pred}
    for mode in ("alloc", "rss"):
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        code = (
            "import json,sys; from blockskip.export.memory.measure import measure_train_step as m; "
            f"print(json.dumps(m(sys.argv[1], sys.argv[2], rss={mode == 'rss'})))"
        )
        r = subprocess.run(
            [sys.executable, "-c", code, str(b), str(c)], capture_output=True, text=True, env=env, check=True
        )
        out[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)
    return out


STREAMED_BACKENDS = ("native", "executorch", "ort")
NATIVE = (
    Path(__file__).resolve().parents[1]
    / "build"
    / "native"
    / "device_train"
    / "native"
    / "blockskip-train-native"
)
# runs a backend's training in a fresh process with its libraries imported first (they are the runtime)
RUN_PY = (
    "import sys, {mod}; from blockskip.device_train import cli; "
    "sys.exit(cli.main(['train', sys.argv[1], '--cache', sys.argv[2], '-o', sys.argv[3], '--backend', "
    "sys.argv[4], '--quiet']))"
)
IMPORTS = {
    "executorch": "torch, executorch.extension.pybindings.portable_lib, blockskip.runtime.backends.executorch",
    "ort": "onnxruntime, blockskip.runtime.backends.ort",
}


def run_streamed(small: bool, work: Path, photos: Path, backends, keep: bool = False) -> list[dict]:
    import torch
    from diffusers import FluxTransformer2DModel

    from blockskip.device_train.app import run_precompute
    from blockskip.export.bundle_writer import export_bundle
    from blockskip.export.families import wrap_model
    from blockskip.export.memory.search import evaluate, split_for
    from blockskip.export.memory.specs import ModelSpec
    from blockskip.runtime.plan import Plan
    from blockskip.runtime.profiles import load_profile

    torch.manual_seed(0)
    lm = wrap_model(
        FluxTransformer2DModel(**model_config(small)), vae_factor=8, text_tokens=64 if small else 512
    )
    params = sum(p.numel() for p in lm.transformer.parameters())
    s_max = 256 if small else 512
    n, m = split_for(lm.family.num_blocks, 0.5)
    plan = Plan(
        front_skip=n,
        back_skip=m,
        s_min=s_max // 2,
        s_max=s_max,
        num_samples=2,
        steps=3,
        lora_rank=16,
        span="streamed",
        storage="int8",
    )
    prompt = lm.encode_prompt("a photo of sks")
    mspec = ModelSpec(
        lm.family, lm.encoder_spec, {k: tuple(v.shape) for k, v in prompt.items()}, lm.vae_factor
    )
    b, c = work / "bundle", work / "cache"
    formats = ["pte"] * any(x in backends for x in ("native", "executorch")) + ["onnx"] * ("ort" in backends)
    if not (keep and (c / "index.json").is_file()):
        shutil.rmtree(work, ignore_errors=True)
        export_bundle(lm, plan, load_profile("desktop-cpu"), "a photo of sks", b, formats=formats)
        run_precompute(b, photos, c, backend="executorch" if "pte" in formats else "ort", quiet=True)
    del lm
    rows = []
    env = dict(
        os.environ,
        BLOCKSKIP_IGNORE_MEMORY_CHECK="1",
        MALLOC_MMAP_THRESHOLD_="65536",
        MALLOC_TRIM_THRESHOLD_="0",
    )
    if "native" in backends and NATIVE.is_file():
        # native precompute from the photos: its whole-process peak against the dry run's precompute phase
        pc = work / "cache-native"
        shutil.rmtree(pc, ignore_errors=True)
        r = subprocess.run(
            [str(NATIVE), "precompute", str(b), "--images", str(photos), "--cache", str(pc), "--quiet"],
            capture_output=True,
            text=True,
            env=env,
        )
        if r.returncode != 0:
            raise RuntimeError(f"native precompute failed:\n{r.stderr[-3000:]}")
        index = json.loads((pc / "index.json").read_text())
        pred = evaluate(mspec, plan, None, fmt="pte", exact=True).reports[0].tensor_peak
        rows.append(
            {
                "backend": "native precompute",
                "params": params,
                "tensors": pred,
                "start": index["start_rss_mib"] * 2**20,
                "peak": index["peak_rss_mib"] * 2**20,
                "step_seconds": float("nan"),
            }
        )
    for be in backends:
        fmt = "onnx" if be == "ort" else "pte"
        pred = evaluate(mspec, plan, None, fmt=fmt, exact=True).reports[1].tensor_peak
        out = work / f"out-{be}"
        shutil.rmtree(out, ignore_errors=True)
        if be == "native":
            if not NATIVE.is_file():
                print("native runner not built (make native): skipped", file=sys.stderr)
                continue
            cmd = [str(NATIVE), str(b), "--cache", str(c), "-o", str(out), "--quiet"]
        else:
            cmd = [sys.executable, "-c", RUN_PY.format(mod=IMPORTS[be]), str(b), str(c), str(out), be]
        # malloc returns freed memory (as in the resident rows): a fixed mmap threshold instead of glibc's
        # dynamic one, which otherwise rises to 32 MiB and keeps freed block weights in the heap
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"{be} failed:\n{r.stderr[-3000:]}")
        log = json.loads((out / "train_log.json").read_text())
        rows.append(
            {
                "backend": be,
                "params": params,
                "tensors": pred,
                "start": log["start_rss_mib"] * 2**20,
                "peak": log["peak_rss_mib"] * 2**20,
                "step_seconds": log["step_seconds"][-1],
            }
        )
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _print_streamed(rows: list[dict]) -> None:
    mib = 2**20
    print(f"model: {rows[0]['params'] / 1e6:.0f}M parameters" if rows else "no rows")
    print(
        "| backend | dry run (MiB) | + runtime at start (MiB) | = predicted (MiB) | peak RSS (MiB) | error "
        "| step (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["tensors"] + r["start"]
        step = "-" if r["step_seconds"] != r["step_seconds"] else f"{r['step_seconds']:.1f}"
        print(
            f"| {r['backend']} | {r['tensors'] / mib:.1f} | {r['start'] / mib:.1f} | {p / mib:.1f} | "
            f"{r['peak'] / mib:.1f} | {(p / r['peak'] - 1) * 100:+.2f}% | {step} |",
            flush=True,
        )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true")
    ap.add_argument(
        "--streamed", action="store_true", help="block-streamed rows on the block-program backends"
    )
    ap.add_argument("--backends", default=",".join(STREAMED_BACKENDS), help="with --streamed: which backends")
    ap.add_argument("--plans", nargs="*", default=list(PLANS))
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument(
        "--work",
        metavar="DIR",
        help="with --streamed: keep the bundle and cache in DIR and reuse them "
        "on the next run (same model and plan)",
    )
    a = ap.parse_args(argv)
    from bench.make_demo_images import main as make_photos

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        photos = Path(tmp) / "photos"
        make_photos([str(photos)])
        if a.streamed:
            bes = [x.strip() for x in a.backends.split(",") if x.strip()]
            bad = [x for x in bes if x not in STREAMED_BACKENDS]
            if bad:
                ap.error(f"unknown backends {bad}; choose from {', '.join(STREAMED_BACKENDS)}")
            work = Path(a.work) if a.work else Path(tmp) / "work"
            rows = run_streamed(a.small, work, photos, bes, keep=bool(a.work))
            _print_streamed(rows)
            if a.json:
                Path(a.json).write_text(json.dumps(rows, indent=1))
            return 0
        for name in a.plans:
            r = run_one(name, PLANS[name], a.small, Path(tmp) / "work", photos)
            rows.append(r)
            _print_row(r, header=len(rows) == 1)
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


def _print_row(r: dict, header: bool) -> None:
    if header:
        print("| plan | predicted (MiB) | allocator (MiB) | error | RSS (MiB) | error | step 2 (s) |")
        print("|---|---|---|---|---|---|---|")
    mib = 2**20
    alloc = r["alloc"]["live0"] + r["alloc"]["alloc_delta"]
    rss = r["rss"]["live0"] + r["rss"]["rss_delta"]
    p = r["predicted"]
    print(
        f"| {r['plan']} | {p / mib:.1f} | {alloc / mib:.1f} | {(p / alloc - 1) * 100:+.2f}% | "
        f"{rss / mib:.1f} | {(p / rss - 1) * 100:+.2f}% | {r['rss']['step_seconds']:.1f} |",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
