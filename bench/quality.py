"""Quality benchmark: does BlockSkip keep the fidelity of plain LoRA on the built-in tiny model?

    python -m bench.quality                       # all configurations, ~15 min on 2 cores
    python -m bench.quality --configs lora-full,skip-0.33 --steps 100 --json q.json

Every configuration trains a LoRA on the demo subject (skimage's chelsea cat, `bench.make_demo_images`)
with the same prompt, steps, learning rate, rank, samples K and seed, through the real commands
(`blockskip-export`, `device-train precompute`, `device-train train`, each its own process), then is
scored by `blockskip.export.evaluate` on the held-out views with the same sampling seeds:

* plain LoRA on all blocks at full resolution (the 128 px photos, no skipping);
* plain LoRA on all blocks at the 64 px training resolution (patch sampling, no skipping);
* BlockSkip at the selection table's skip ratios (64 px patches of 128 px photos);
* BlockSkip 3 of 9 with the whole photo resized to 64 px instead of timestep-aware patches;
* BlockSkip 3 of 9 with the last m blocks dropped instead of replaced by their residual.

Columns: EffNet-I after training (before: the base model, the same for all), held-out flow-matching
loss after training, the training step's measured memory (tensors live before step 2 plus the step's
allocator peak, torch.profiler) next to the dry run's tensor prediction, the train process's peak RSS,
and the median time per optimizer step.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROMPT = "a photo of sks cat"
COMMON = [
    "--rank",
    "16",
    "--samples",
    "64",
    "--lr",
    "1e-3",
    "--base-quant",
    "none",
    "--checkpointing",
    "off",
    "--seed",
    "0",
]
CONFIGS = {
    "lora-full": ("LoRA, all blocks, 128 px", ["-n", "0", "-m", "0", "--s-min", "128", "--s-max", "128"]),
    "lora-64": ("LoRA, all blocks, 64 px patches", ["-n", "0", "-m", "0"]),
    "skip-0.33": ("BlockSkip 3 of 9 blocks", ["--skip-ratio", "0.33"]),
    "skip-0.44": ("BlockSkip 4 of 9 blocks", ["--skip-ratio", "0.44"]),
    "skip-0.56": ("BlockSkip 5 of 9 blocks", ["--skip-ratio", "0.56"]),
    "skip-0.33-resize": (
        "BlockSkip 3 of 9, resize (no patch sampling)",
        ["--skip-ratio", "0.33", "--no-patch-sampling"],
    ),
    "skip-0.33-noresid": ("BlockSkip 3 of 9, no residual", ["--skip-ratio", "0.33", "--no-residual"]),
}
MIB = 2**20


def _bin(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    return (
        [str(exe)]
        if exe.exists()
        else [
            sys.executable,
            "-m",
            {"blockskip-export": "blockskip.export.cli", "device-train": "blockskip.device_train.cli"}[name],
        ]
    )


def _run(cmd: list[str], log) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"command failed ({r.returncode}): {' '.join(cmd)}\n{r.stderr[-3000:]}")
    log(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "")
    return r.stdout + r.stderr


def run_config(key: str, steps: int, work: Path, photos: Path, log) -> dict:
    name, args = CONFIGS[key]
    bundle, cache, out = work / "bundle", work / "cache", work / "run"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.time()
    err = _run(
        _bin("blockskip-export")
        + [
            "--model",
            "tiny",
            "--profile",
            "desktop-cpu",
            "--prompt",
            PROMPT,
            "--steps",
            str(steps),
            *COMMON,
            *args,
            "-o",
            str(bundle),
        ],
        log,
    )
    _run(
        _bin("device-train")
        + ["precompute", str(bundle), "--images", str(photos), "--cache", str(cache), "--quiet"],
        log,
    )
    _run(_bin("device-train") + ["train", str(bundle), "--cache", str(cache), "-o", str(out), "--quiet"], log)
    train_log = json.loads((out / "train_log.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    code = (
        "import json,sys; from blockskip.export.memory.measure import measure_train_step as m; "
        "print(json.dumps(m(sys.argv[1], sys.argv[2])))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(bundle), str(cache)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    step_mem = json.loads(r.stdout.strip().splitlines()[-1])
    secs = sorted(train_log["step_seconds"])
    return {
        "key": key,
        "name": name,
        "plan": manifest["plan"],
        "trained": manifest["model"]["trained"],
        "predicted_tensor_peak": _predicted(bundle),
        "measured_tensor_peak": step_mem["live0"] + step_mem["alloc_delta"],
        "train_peak_rss_mib": train_log["peak_rss_mib"],
        "step_ms": secs[len(secs) // 2] * 1000,
        "final_loss": sum(train_log["losses"][-10:]) / min(10, len(train_log["losses"])),
        "lora": str(out / "lora.safetensors"),
        "wall_s": time.time() - t0,
        "export_note": err.strip()[-200:],
    }


def _predicted(bundle: Path) -> int:
    from blockskip.export.memory.search import evaluate
    from blockskip.export.memory.specs import load_spec
    from blockskip.runtime.bundle import Bundle
    from blockskip.runtime.profiles import profile_of_bundle

    b = Bundle(bundle)
    spec, _ = load_spec(b.manifest["source_model"])
    reports = evaluate(spec, b.plan, profile_of_bundle(b.manifest)).reports
    return next(r.tensor_peak for r in reports if r.phase == "train")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.quality",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    ap.add_argument(
        "--steps", type=int, default=300, help="optimizer steps (the same for every configuration)"
    )
    ap.add_argument("--seeds", default="0,1,2,3,4,5,6,7", help="sampling seeds of the evaluation")
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument(
        "--keep", default=None, help="keep each configuration's bundle, cache and LoRA under this folder"
    )
    a = ap.parse_args(argv)
    keys = [k.strip() for k in a.configs.split(",") if k.strip()]
    bad = [k for k in keys if k not in CONFIGS]
    if bad:
        ap.error(f"unknown configuration(s) {bad}; choose from {', '.join(CONFIGS)}")
    seeds = [int(s) for s in a.seeds.split(",")]

    import torch

    from bench.make_demo_images import main as make_photos
    from blockskip.export.evaluate import evaluate, load_views
    from blockskip.export.families import load_model

    def log(msg):
        if msg:
            print(f"  {msg}", file=sys.stderr, flush=True)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.keep) if a.keep else Path(tmp)
        photos, held = root / "photos", root / "heldout"
        make_photos([str(photos), str(held)])
        lm = load_model("tiny")
        views = load_views(held, 64)
        base = None
        for k in keys:
            print(f"[{k}] {CONFIGS[k][0]}", file=sys.stderr, flush=True)
            row = run_config(k, a.steps, root / k, photos, log)
            torch.manual_seed(0)
            scores, _ = evaluate(lm, row["lora"], views, PROMPT, seeds=seeds, steps=a.sample_steps, size=64)
            base = base or scores["before"]
            row.update(
                effnet_i=scores["after"]["effnet_i"],
                heldout_loss=scores["after"]["heldout_loss"],
                prompt_sensitivity=scores["after"]["prompt_sensitivity"],
                before=scores["before"],
            )
            rows.append(row)
            print(format_row(row, header=len(rows) == 1, base=base), flush=True)
    if a.json:
        Path(a.json).write_text(
            json.dumps(
                {"steps": a.steps, "seeds": seeds, "prompt": PROMPT, "common": COMMON, "rows": rows}, indent=1
            )
        )
    return 0


def format_row(r: dict, header: bool, base: dict) -> str:
    lines = []
    if header:
        lines += [
            f"base model: EffNet-I {base['effnet_i']:.4f}, held-out loss {base['heldout_loss']:.4f}, "
            f"prompt sensitivity {base['prompt_sensitivity']:.3f}",
            "| configuration | trained blocks | EffNet-I | held-out loss | prompt sensitivity | step memory: "
            "measured / dry run (MiB) | train peak RSS (MiB) | ms/step |",
            "|---|---|---|---|---|---|---|---|",
        ]
    t = r["trained"]
    lines.append(
        f"| {r['name']} | {t[0]}..{t[-1]} ({len(t)}) | {r['effnet_i']:.4f} | {r['heldout_loss']:.4f} | "
        f"{r['prompt_sensitivity']:.3f} | "
        f"{r['measured_tensor_peak'] / MIB:.1f} / {r['predicted_tensor_peak'] / MIB:.1f} | "
        f"{r['train_peak_rss_mib']:.0f} | {r['step_ms']:.0f} |"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
