"""Predicted vs measured training-step time on this machine: the dry run's time prediction
(``export/memory/cost.py``: FLOPs and bytes of every op it traces, a roofline per op, per-op overhead)
against the same plan's steps timed here, per backend.

First calibrates this machine (``blockskip-plan --calibrate``'s measurement, in-process), then for each
configuration exports a bundle, precomputes a small cache and times optimizer steps (as
``bench.step_time`` does; the fastest step counts, as the calibration takes the fastest call: other
processes on the cores only slow steps down), and prints a markdown table: configuration | backend | span | predicted |
measured | error. Configurations:

* ``tiny``: the built-in model with the demo's plan (3 of 9 blocks skipped, 64 px crops, LoRA r16);
* ``flux63m``: ``bench.step_time``'s 63M FLUX-like model, 2 of 4 blocks trained at 128 px, LoRA r16,
  resident and block-streamed on torch; block-streamed on ExecuTorch (XNNPACK) through the native runner;
* ``--realscale DIR``: the training rows of ``bench.realscale`` runs in DIR (their bundles' plans
  predicted, their logged step times measured).

    python -m bench.time_accuracy                    # ~6 min on 2 cores
    python -m bench.time_accuracy --realscale /tmp/real
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path


def calibrated_profile(log=print):
    from blockskip.export.memory.cost import calibrate
    from blockskip.runtime.profiles import load_profile

    base = load_profile("desktop-cpu")
    fig = calibrate(log=log)
    return dataclasses.replace(
        base,
        name="desktop-cpu (calibrated)",
        bandwidth_gbs=fig["bandwidth_gbs"],
        throughput=fig["throughput"],
        op_overhead_us={**base.op_overhead_us, **fig["op_overhead_us"]},
    )


def predict(spec, plan, profile, fmt: str, delegate: str = "none") -> float:
    from blockskip.export.memory.dryrun import timing
    from blockskip.export.memory.search import evaluate

    c = evaluate(spec, plan, profile, fmt=fmt, delegate=delegate, exact=False)
    return timing(c.reports, profile, fmt)["train_per_step"]


def _tiny(work: Path, a) -> list[dict]:
    from bench.step_time import bench_torch, write_photos
    from blockskip.device_train.app import run_precompute
    from blockskip.export.bundle_writer import export_bundle
    from blockskip.export.families import load_model
    from blockskip.runtime.bundle import Bundle
    from blockskip.runtime.plan import Plan
    from blockskip.runtime.profiles import load_profile

    lm = load_model("tiny")
    plan = Plan(
        front_skip=2, back_skip=1, s_min=64, s_max=128, num_samples=4, lora_rank=16, steps=a.warmup + a.steps
    )
    export_bundle(lm, plan, load_profile("desktop-cpu"), "a photo of sks cat", work / "tiny-bundle")
    run_precompute(
        work / "tiny-bundle", write_photos(work / "tiny-photos", 2, 128), work / "tiny-cache", quiet=True
    )
    measured = min(bench_torch(work / "tiny-bundle", work / "tiny-cache", a)["secs"])
    return [
        {
            "config": "tiny (built-in, 3 of 9 blocks skipped)",
            "backend": "torch",
            "span": "resident",
            "predicted": predict(lm.model_spec(), Bundle(work / "tiny-bundle").plan, a.profile, "torch"),
            "measured": measured,
        }
    ]


def _flux63m(work: Path, a) -> list[dict]:
    import torch
    from diffusers import FluxTransformer2DModel

    from bench.step_time import MODEL, PROMPT, bench_native, bench_streamed, bench_torch, write_photos
    from blockskip.device_train.app import run_precompute
    from blockskip.export.bundle_writer import export_bundle
    from blockskip.export.families import wrap_model
    from blockskip.runtime.bundle import Bundle
    from blockskip.runtime.plan import Plan
    from blockskip.runtime.profiles import load_profile

    torch.manual_seed(0)
    lm = wrap_model(FluxTransformer2DModel(**MODEL), name="bench-flux", vae_factor=4)
    spec = lm.model_spec()
    plan = Plan(
        front_skip=1,
        back_skip=1,
        s_min=128,
        s_max=256,
        num_samples=4,
        lora_rank=16,
        steps=a.warmup + a.steps,
        grad_accum=1,
    )
    streamed = dataclasses.replace(plan, span="streamed", storage="float32")
    prof = load_profile("desktop-cpu")
    export_bundle(lm, plan, prof, PROMPT, work / "b-res")
    export_bundle(lm, streamed, prof, PROMPT, work / "b-str", formats=["torch"])
    export_bundle(lm, streamed, prof, PROMPT, work / "b-pte", formats=["pte"], delegate="xnnpack")
    del lm
    photos = write_photos(work / "photos", 2, 256)
    for b in ("res", "str", "pte"):
        run_precompute(
            work / f"b-{b}",
            photos,
            work / f"c-{b}",
            quiet=True,
            backend="executorch" if b == "pte" else "torch",
        )
    rows = []
    secs = bench_torch(work / "b-res", work / "c-res", a)["secs"]
    rows.append(
        {
            "config": "flux63m (bench.step_time model)",
            "backend": "torch",
            "span": "resident",
            "predicted": predict(spec, Bundle(work / "b-res").plan, a.profile, "torch"),
            "measured": min(secs),
        }
    )
    secs = bench_streamed("torch", work / "b-str", work / "c-str", a)["secs"]
    rows.append(
        {
            "config": "flux63m",
            "backend": "torch",
            "span": "streamed",
            "predicted": predict(spec, Bundle(work / "b-str").plan, a.profile, "torch"),
            "measured": min(secs),
        }
    )
    nat = bench_native(work / "b-pte", work / "c-pte", work, a)
    if nat is not None:
        rows.append(
            {
                "config": "flux63m",
                "backend": "native (pte, XNNPACK)",
                "span": "streamed",
                "predicted": predict(spec, Bundle(work / "b-pte").plan, a.profile, "pte", "xnnpack"),
                "measured": min(nat["secs"]),
            }
        )
    return rows


def _realscale(root: Path, a) -> list[dict]:
    """The train rows of ``bench.realscale`` runs under ``root``: their plans (the bundle's manifest, or
    the run's ``train_log.json`` once the bundle is removed, as realscale does without ``--keep``)
    predicted against the step time they logged."""
    from blockskip.export.memory.specs import load_spec
    from blockskip.runtime.bundle import Bundle
    from blockskip.runtime.plan import Plan

    rows = []
    for path in sorted(root.glob("*-runs/*.rows.json")):
        model, config = path.parent.name.removesuffix("-runs"), path.name.removesuffix(".rows.json")
        record = json.loads(path.read_text())
        train = [r for r in record["rows"] if r["phase"] == "train"]
        bundle_dir, log = path.parent / f"{config}-bundle", path.parent / f"{config}-out" / "train_log.json"
        if not train:
            continue
        if (bundle_dir / "manifest.json").is_file():
            bundle = Bundle(bundle_dir)
            plan, formats = bundle.plan, bundle.manifest.get("formats", [])
            delegate = bundle.manifest.get("pte", {}).get("delegate", "none")
        elif log.is_file():
            tlog = json.loads(log.read_text())
            plan, formats, delegate = Plan.from_dict(tlog["plan"]), [], tlog.get("delegate") or "none"
        else:
            continue
        fmt = "pte" if "pte" in formats or "pte" in config else "torch"
        spec, _ = load_spec(model)
        rows.append(
            {
                "config": f"{model} ({config}, bench.realscale {record.get('when', '')})",
                "backend": train[0]["backend"],
                "span": plan.span,
                "predicted": predict(spec, plan, a.profile, fmt, delegate if fmt == "pte" else "none"),
                "measured": train[0]["seconds"],
            }
        )
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.time_accuracy",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--steps", type=int, default=16, help="timed optimizer steps per row (default 16)")
    ap.add_argument(
        "--warmup", type=int, default=4, help="untimed steps first (a step's first seconds run slow)"
    )
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", default="tiny,flux63m", help="configurations: tiny, flux63m (comma-separated)")
    ap.add_argument(
        "--realscale", metavar="DIR", help="also the training rows of bench.realscale runs in DIR"
    )
    ap.add_argument("--json", metavar="FILE", help="write the rows as JSON")
    a = ap.parse_args(argv)
    t0 = time.time()
    print("calibrating this machine ...", flush=True)
    a.profile = calibrated_profile(lambda m: print(m, flush=True))
    work = Path(tempfile.mkdtemp(prefix="time-accuracy-"))
    rows: list[dict] = []
    try:
        for name in [c.strip() for c in a.only.split(",") if c.strip()]:
            print(f"[{(time.time() - t0) / 60:5.1f} min] {name} ...", flush=True)
            rows += {"tiny": _tiny, "flux63m": _flux63m}[name](work / name, a)
        if a.realscale:
            print(f"[{(time.time() - t0) / 60:5.1f} min] realscale rows in {a.realscale} ...", flush=True)
            rows += _realscale(Path(a.realscale), a)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("\n| configuration | backend | span | predicted (s/step) | measured (s/step) | error |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        err = r["predicted"] / r["measured"] - 1
        print(
            f"| {r['config']} | {r['backend']} | {r['span']} | {r['predicted']:.3g} | {r['measured']:.3g} | "
            f"{err:+.0%} |"
        )
    p = a.profile
    print(
        f"\nprofile: {p.name}: matmul {p.throughput['cpu']} GFLOP/s, copy {p.bandwidth_gbs} GB/s, "
        f"eager torch {p.op_overhead_us.get('torch')} us/op; {(time.time() - t0) / 60:.1f} min"
    )
    if a.json:
        Path(a.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
