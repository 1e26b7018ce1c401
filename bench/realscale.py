"""Real-size models end to end: export -> precompute -> train, each phase in its own process, measured
against the dry run.

    python -m bench.realscale sana-1.6b      # ~15 min on 2 cores
    python -m bench.realscale sd35-medium    # ~30 min
    python -m bench.realscale flux-dev       # ~1 h; the baselines do not fit in 24 GiB and are not run

Writes (once, cached) a random-weight diffusers folder at the model's real config (``bench.random_folder``:
bfloat16 transformer shard by shard, the real VAE config, prompt embeddings) and synthetic photos,
then runs, for BlockSkip 50% (``split_for``) at s_max/2 crops of s_max photos, a few samples and steps:

* ``torch``: the plan the ``jetson-orin-nx-16gb`` profile chooses, ``--format torch``, precompute and
  training by ``device-train --backend torch``;
* ``pte``: the block-streamed int8 plan the ``snapdragon8`` profile chooses (``--span streamed``: a
  resident span's training program holds the whole trained span in float32, GBs at these sizes;
  ``--storage int8``: a phone keeps the bundle, FLUX.1-dev's is 12 GB so), ``--format pte --delegate
  xnnpack`` (the portable kernels run a 512 px photo encoder for many minutes and a block's matmuls on
  one core), precompute and training by the native runner (``make native``);
* baselines (where they fit this machine): LoRA on every block at full resolution (no skip, no patch
  sampling), bfloat16, with and without gradient checkpointing, and with an nf4 base (QLoRA), through
  the same torch runtime (peft LoRA layers).

Each phase's measurement is its process's peak RSS (``wait4``'s ``ru_maxrss``, the phase started by a
small launcher process: ``LAUNCHER``); the prediction is the
dry run of the bundle's plan for that format (tensors, no device overhead) plus the process's RSS before
the phase started (the interpreter and libraries, or the native runner's), and for the export the export
phase's prediction (``export/memory/export_phase.py``). Prints a markdown table and writes it to
``DIR/MODEL/realscale.md``. Each configuration's rows are kept in ``DIR/MODEL-runs/CONFIG.rows.json``: a run
with ``--only`` completes its table with the other configurations' last measurements, dated.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NATIVE = ROOT / "build" / "native" / "device_train" / "native" / "blockskip-train-native"
PROMPT = "a photo of sks dog"
S_MAX = {"flux-dev": 512, "sd35-medium": 1024, "sana-1.6b": 1024}
#: runs a device-train command after its libraries are imported, printing its RSS then (the runtime): the
#: torch backend's modules, peft, and the diffusers classes it builds (diffusers imports a class's module
#: at its first use: 172 MiB with peft, after torch and diffusers themselves)
WRAP = (
    "import sys, resource, torch, diffusers, peft, blockskip.device_train.cli as c\n"
    "import blockskip.runtime.backends.torch, blockskip.runtime.backends.torch_stream\n"
    "for k in ('FluxTransformer2DModel', 'SD3Transformer2DModel', 'SanaTransformer2DModel', 'AutoencoderKL',\n"
    "          'AutoencoderDC'):\n"
    "    getattr(diffusers, k)\n"
    "from blockskip.runtime.memory import rss_bytes\n"
    "print(f'START_RSS {rss_bytes()}', file=sys.stderr, flush=True)\n"
    "sys.exit(c.main(sys.argv[1:]))"
)


def _photos(folder: Path, side: int, count: int) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k in range(count):
        if not (folder / f"photo_{k}.png").is_file():
            yy, xx = np.mgrid[0:side, 0:side] / side
            img = np.stack([np.sin(6 * xx + k), np.cos(5 * yy - k), np.sin(4 * (xx + yy))], -1) * 0.4 + 0.5
            img = img + rng.normal(0, 0.03, img.shape)
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8)).save(folder / f"photo_{k}.png")
    return folder


#: a small process that starts every phase and reports its peak RSS. A process's ``ru_maxrss`` counts the
#: memory of the process it was forked from (Linux keeps the forking image's high-water mark across the
#: exec): started from this one, which may have written a GB-sized shard, every phase measured at least
#: that (SD3.5-medium's export: 3448 MiB measured, 1206 MiB by the export itself)
LAUNCHER = (
    "import json, os, subprocess, sys\n"
    "for line in sys.stdin:\n"
    "    job = json.loads(line)\n"
    "    with open(job['log'], 'w') as out:\n"
    "        p = subprocess.Popen(job['cmd'], stdout=out, stderr=subprocess.STDOUT, env=job['env'])\n"
    "        _, status, ru = os.wait4(p.pid, 0)\n"
    "    print(json.dumps({'status': status, 'maxrss': ru.ru_maxrss}), flush=True)\n"
)


class Phases:
    """Runs phase commands in their own processes (started by ``LAUNCHER``); their peak RSS, start RSS and
    wall time; an ETA."""

    def __init__(self, total: int):
        self.total, self.done, self.t0 = total, 0, time.time()
        self.launcher = subprocess.Popen(
            [sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )

    def run(self, label: str, cmd: list[str], log: Path) -> dict:
        left = self.total - self.done
        eta = "" if not self.done else f", ETA {(time.time() - self.t0) / self.done * left / 60:.0f} min"
        print(
            f"[{(time.time() - self.t0) / 60:5.1f} min] {label} ({self.done + 1}/{self.total}{eta})",
            flush=True,
        )
        env = dict(os.environ, BLOCKSKIP_IGNORE_MEMORY_CHECK="1")
        t = time.time()
        self.launcher.stdin.write(json.dumps({"cmd": cmd, "log": str(log), "env": env}) + "\n")
        self.launcher.stdin.flush()
        reply = self.launcher.stdout.readline()
        if not reply:
            raise RuntimeError(f"{label}: the phase launcher stopped")
        got = json.loads(reply)
        status = got["status"]
        self.done += 1
        text = log.read_text()
        if os.waitstatus_to_exitcode(status) != 0:
            raise RuntimeError(
                f"{label} failed ({os.waitstatus_to_exitcode(status)}); see {log}:\n{text[-3000:]}"
            )
        start = next(
            (int(line.split()[1]) for line in text.splitlines() if line.startswith("START_RSS ")), None
        )
        return {"peak": got["maxrss"] * 1024, "start": start, "seconds": time.time() - t, "text": text}

    def close(self) -> None:
        self.launcher.stdin.close()
        self.launcher.wait()


def _python(args: list[str]) -> list[str]:
    return [sys.executable, "-c", WRAP, *args]


def _predicted(folder: Path, bundle: Path, fmt: str, num_images: int) -> dict[str, int]:
    """Tensor peaks of the bundle's plan by phase (the dry run for these photos, no device overhead)."""
    from blockskip.export.memory.search import evaluate
    from blockskip.export.memory.specs import load_spec
    from blockskip.runtime.plan import Plan

    spec, _ = load_spec(str(folder))
    manifest = json.loads((bundle / "manifest.json").read_text())
    plan = Plan.from_dict(manifest["plan"])
    delegate = manifest.get("pte", {}).get("delegate", "none")
    return {
        r.phase: r.tensor_peak
        for r in evaluate(
            spec, plan, None, num_images=num_images, fmt=fmt, exact=fmt == "pte", delegate=delegate
        ).reports
    }


def run_path(
    name: str,
    folder: Path,
    photos: Path,
    work: Path,
    ph: Phases,
    export_args: list[str],
    fmt: str,
    native: bool,
    keep: bool = False,
) -> list[dict]:
    """export, precompute and train of one configuration; its rows."""
    bundle, cache, out = work / f"{name}-bundle", work / f"{name}-cache", work / f"{name}-out"
    for d in (bundle, cache, out):
        shutil.rmtree(d, ignore_errors=True)
    e = ph.run(
        f"{name}: export",
        [
            sys.executable,
            "-m",
            "blockskip.export.cli",
            "--model",
            str(folder),
            "--prompt",
            PROMPT,
            "-o",
            str(bundle),
            *export_args,
        ],
        work / f"{name}-export.log",
    )
    pred_export = next(
        (
            float(line.rsplit("predicted ", 1)[1].split()[0]) * 2**20
            for line in e["text"].splitlines()
            if line.startswith("bundle written") and "predicted" in line
        ),
        None,
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    plan = manifest["plan"]
    desc = (
        f"n={plan['front_skip']} m={plan['back_skip']} {plan['s_min']}/{plan['s_max']} px r{plan['lora_rank']} "
        + (
            f"streamed {plan['storage']}"
            if plan["span"] == "streamed"
            else f"{plan['dtype']} base {plan['base_quant']}{' ckpt' if plan['checkpointing'] else ''}"
        )
    )
    pred = _predicted(folder, bundle, fmt, len(list(photos.glob("photo_*.png"))))
    backend = "native" if native else "torch"
    if native:
        p = ph.run(
            f"{name}: precompute",
            [
                str(NATIVE),
                "precompute",
                str(bundle),
                "--images",
                str(photos),
                "--cache",
                str(cache),
                "--quiet",
            ],
            work / f"{name}-precompute.log",
        )
        p["start"] = json.loads((cache / "index.json").read_text())["start_rss_mib"] * 2**20
        t = ph.run(
            f"{name}: train",
            [str(NATIVE), str(bundle), "--cache", str(cache), "-o", str(out), "--quiet"],
            work / f"{name}-train.log",
        )
    else:
        p = ph.run(
            f"{name}: precompute",
            _python(
                [
                    "precompute",
                    str(bundle),
                    "--images",
                    str(photos),
                    "--cache",
                    str(cache),
                    "--backend",
                    "torch",
                    "--quiet",
                ]
            ),
            work / f"{name}-precompute.log",
        )
        t = ph.run(
            f"{name}: train",
            _python(
                ["train", str(bundle), "--cache", str(cache), "-o", str(out), "--backend", "torch", "--quiet"]
            ),
            work / f"{name}-train.log",
        )
    tlog = json.loads((out / "train_log.json").read_text())
    t["start"] = tlog.get("start_rss_mib", 0) * 2**20 if native else t["start"]
    steps = tlog["step_seconds"][1:] or tlog["step_seconds"]  # the first step warms up
    rows = [
        {
            "config": name,
            "plan": desc,
            "backend": backend,
            "phase": "export",
            "predicted": pred_export,
            "measured": e["peak"],
            "seconds": e["seconds"],
        },
        {
            "config": name,
            "plan": desc,
            "backend": backend,
            "phase": "precompute",
            "predicted": pred["precompute"] + p["start"],
            "measured": p["peak"],
            "seconds": p["seconds"] / max(1, plan["num_samples"]),
            "per": "sample",
        },
        {
            "config": name,
            "plan": desc,
            "backend": backend,
            "phase": "train",
            "predicted": max(pred["train"], pred.get("save", 0)) + t["start"],
            "measured": t["peak"],
            "seconds": statistics.median(steps),
            "per": "step",
        },
    ]
    if not keep:
        shutil.rmtree(bundle, ignore_errors=True)  # real-size bundles are GBs
        shutil.rmtree(cache, ignore_errors=True)
    return rows


def table(rows: list[dict]) -> str:
    mib = 2**20
    out = [
        "| model | configuration | plan | backend | phase | predicted (MiB) | measured (MiB) | error | s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, m = r.get("predicted"), r.get("measured")
        pred = f"{p / mib:.0f}" if p else "-"
        meas = f"{m / mib:.0f}" if m else r.get("note", "-")
        err = f"{(p / m - 1) * 100:+.1f}%" if p and m else "-"
        sec = f"{r['seconds']:.1f}" + (f" / {r['per']}" if r.get("per") else "") if r.get("seconds") else "-"
        out.append(
            f"| {r['model']} | {r['config']} | {r['plan']} | {r['backend']} | {r['phase']} | {pred} | {meas} "
            f"| {err} | {sec} |"
        )
    return "\n".join(out)


def ratios(rows: list[dict]) -> list[str]:
    """BlockSkip against each baseline: peak memory and step time of training."""
    train = {r["config"].split(" (")[0]: r for r in rows if r["phase"] == "train" and r.get("measured")}
    lines = []
    for bs in ("blockskip-torch", "blockskip-pte"):
        for base in ("lora", "lora-ckpt", "qlora"):
            if bs in train and base in train:
                a, b = train[bs], train[base]
                lines.append(
                    f"{bs} / {base}: memory {a['measured'] / b['measured']:.2f}x, "
                    f"time per step {a['seconds'] / b['seconds']:.2f}x"
                )
    return lines


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=sorted(S_MAX))
    ap.add_argument(
        "--dir",
        default=os.path.join(os.path.expanduser("~"), ".cache", "blockskip", "realscale"),
        help="where the random folder (cached), photos and bundles go",
    )
    ap.add_argument("--photos", type=int, default=2, help="synthetic photos (each is encoded at s_max)")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument(
        "--only",
        default="blockskip-torch,blockskip-pte,lora,lora-ckpt,qlora",
        help="configurations to run (comma-separated)",
    )
    ap.add_argument("--keep", action="store_true", help="keep the bundles and caches (GBs each)")
    a = ap.parse_args(argv)
    from bench.random_folder import write_folder
    from blockskip.export.memory.search import split_for
    from blockskip.export.memory.specs import load_spec

    root = Path(a.dir)
    folder = write_folder(a.model, root / a.model)
    s_max = S_MAX[a.model]
    photos = _photos(root / f"photos-{s_max}-{a.photos}", s_max, a.photos)
    work = root / f"{a.model}-runs"
    work.mkdir(parents=True, exist_ok=True)
    spec, _ = load_spec(str(folder))
    n, m = split_for(spec.family.num_blocks, 0.5)
    common = ["--samples", str(a.samples), "--steps", str(a.steps), "--rank", "16", "--force"]
    bs = ["-n", str(n), "-m", str(m), "--s-min", str(s_max // 2), "--s-max", str(s_max), *common]
    full = [
        "-n",
        "0",
        "-m",
        "0",
        "--s-min",
        str(s_max),
        "--s-max",
        str(s_max),
        "--no-patch-sampling",
        "--dtype",
        "bfloat16",
        "--span",
        "resident",
        *common,
    ]
    configs = {
        "blockskip-torch": (["--profile", "jetson-orin-nx-16gb", "--format", "torch", *bs], "torch", False),
        "blockskip-pte": (
            [
                "--profile",
                "snapdragon8",
                "--format",
                "pte",
                "--delegate",
                "xnnpack",
                "--span",
                "streamed",
                "--storage",
                "int8",
                *bs,
            ],
            "pte",
            True,
        ),
        "lora": (
            ["--profile", "desktop-cpu", *full, "--checkpointing", "off", "--base-quant", "none"],
            "torch",
            False,
        ),
        "lora-ckpt": (
            ["--profile", "desktop-cpu", *full, "--checkpointing", "on", "--base-quant", "none"],
            "torch",
            False,
        ),
        "qlora": (
            ["--profile", "desktop-cpu", *full, "--checkpointing", "on", "--base-quant", "nf4"],
            "torch",
            False,
        ),
    }
    chosen = [c for c in a.only.split(",") if c]
    unknown = [c for c in chosen if c not in configs]
    if unknown:
        ap.error(f"unknown configuration(s) {unknown}; choose from {', '.join(configs)}")
    # a baseline holds the whole transformer: run it only where its dry run fits this machine's memory
    avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows, runnable = [], []
    for c in chosen:
        if c.startswith("blockskip"):
            runnable.append(c)
            continue
        need = _baseline_need(
            spec, n_blocks=spec.family.num_blocks, s_max=s_max, quant=c == "qlora", ckpt=c != "lora"
        )
        if need > 0.8 * avail:
            rows.append(
                {
                    "model": a.model,
                    "config": c,
                    "plan": "no skip, full res",
                    "backend": "torch",
                    "phase": "train",
                    "predicted": need,
                    "measured": None,
                    "note": f"not run: needs {need / 2**30:.1f} GiB of {avail / 2**30:.0f}",
                }
            )
        else:
            runnable.append(c)
    if not NATIVE.is_file() and "blockskip-pte" in runnable:
        print("the native runner is not built (make native): blockskip-pte skipped", file=sys.stderr)
        runnable.remove("blockskip-pte")
    ph = Phases(3 * len(runnable))
    for c in runnable:
        args, fmt, native = configs[c]
        got = [
            {"model": a.model, **r} for r in run_path(c, folder, photos, work, ph, args, fmt, native, a.keep)
        ]
        (work / f"{c}.rows.json").write_text(
            json.dumps({"when": time.strftime("%Y-%m-%d %H:%M"), "rows": got})
        )
        rows.extend(got)
    ph.close()
    # configurations measured by an earlier run (--only) complete the table, marked with their date
    for c in configs:
        f = work / f"{c}.rows.json"
        if c not in chosen and f.is_file():
            earlier = json.loads(f.read_text())
            rows.extend({**r, "config": f"{c} ({earlier['when']})"} for r in earlier["rows"])
    text = table(rows) + "\n\n" + "\n".join(ratios(rows)) + "\n"
    (root / a.model / "realscale.md").write_text(text)
    print(text)
    return 0


def _baseline_need(spec, n_blocks: int, s_max: int, quant: bool, ckpt: bool) -> int:
    """The dry run's training peak of a no-skip, full-resolution LoRA plan (bfloat16)."""
    from blockskip.export.memory.search import evaluate
    from blockskip.runtime.plan import Plan

    plan = Plan(
        front_skip=0,
        back_skip=0,
        s_min=s_max,
        s_max=s_max,
        patch_sampling=False,
        dtype="bfloat16",
        lora_rank=16,
        num_samples=2,
        steps=2,
        checkpointing=ckpt,
        base_quant="nf4" if quant else "none",
    )
    return max(r.tensor_peak for r in evaluate(spec, plan, None, fmt="torch").reports)


if __name__ == "__main__":
    sys.exit(main())
