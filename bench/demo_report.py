"""The demo's report: the plan, the dry run's memory prediction next to the measured peaks, the fidelity
scores before and after the LoRA, and where the files are.

    python -m bench.demo_report out/demo          # after the steps of `make demo`; writes out/demo/report.md

With ``run-pte/`` present (the demo's second line), a section for the same plan on the phone path.

Reads ``bundle/`` (manifest: plan, profile), ``run/cache/index.json`` (precompute's peak RSS),
``run/train_log.json`` (training's peak RSS, step times, losses) and ``eval.json`` (blockskip-eval).
The dry run is recomputed here for the bundle's plan (no weights, nothing allocated). Its process figure
is the live-tensor peak plus the profile's runtime overhead (Python + torch + diffusers, a measured
constant) and allocator slack, without the profile's safety margin, so it is comparable to a peak RSS.
The measured baseline is the peak RSS of a process that only imports what device-train imports; peak
RSS minus that baseline is comparable to the tensor peak.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

MIB = 2**20
BASELINE_CODE = (
    "import blockskip.device_train.app, blockskip.runtime.backends.torch, diffusers, peft, safetensors.torch; "
    "from blockskip.runtime.memory import peak_rss_mib; print(peak_rss_mib())"
)


def baseline_rss_mib() -> float:
    r = subprocess.run([sys.executable, "-c", BASELINE_CODE], capture_output=True, text=True, check=True)
    return float(r.stdout.strip().splitlines()[-1])


def dry_run(bundle_dir: Path, num_images: int, fmt: str = "torch"):
    from blockskip.export.memory.search import evaluate
    from blockskip.export.memory.specs import load_spec
    from blockskip.runtime.bundle import Bundle
    from blockskip.runtime.profiles import profile_of_bundle

    b = Bundle(bundle_dir)
    spec, _ = load_spec(b.manifest["source_model"])
    profile = profile_of_bundle(b.manifest)
    return b.plan, profile, evaluate(spec, b.plan, profile, num_images=num_images, fmt=fmt).reports


def build(out: Path) -> str:
    out = Path(out)
    log = json.loads((out / "run" / "train_log.json").read_text())
    index = json.loads((out / "run" / "cache" / "index.json").read_text())
    scores = json.loads((out / "eval.json").read_text())
    n_photos = len(list((out / "photos").glob("*.png")))
    plan, profile, reports = dry_run(out / "bundle", n_photos)
    model = json.loads((out / "bundle" / "manifest.json").read_text())["source_model"]
    margin = profile.safety_margin_mib * MIB
    base = baseline_rss_mib()
    measured = {"precompute": index.get("peak_rss_mib"), "train": log["peak_rss_mib"]}
    lines = [
        "# dit-blockskip demo report",
        "",
        f"Model `{model}`; plan: {describe(plan)}; profile `{profile.name}` (budget {profile.budget_gib:.1f} GiB).",
        "",
        "## Memory: dry run vs measured",
        "",
        "| phase | dry run: tensors (MiB) | dry run: process (MiB) | measured peak RSS (MiB) | measured - baseline "
        "(MiB) | process error |",
        "|---|---|---|---|---|---|",
    ]
    for r in reports:
        m = measured.get(r.phase)
        proc = (r.peak - margin) / MIB
        if m is None:
            lines.append(f"| {r.phase} | {r.tensor_peak / MIB:.1f} | {proc:.1f} | - | - | - |")
            continue
        lines.append(
            f"| {r.phase} | {r.tensor_peak / MIB:.1f} | {proc:.1f} | {m:.1f} | {m - base:.1f} | "
            f"{(proc / m - 1) * 100:+.1f}% |"
        )
    non_tensor = {r.phase: measured[r.phase] - r.tensor_peak / MIB for r in reports if measured.get(r.phase)}
    lines += [
        "",
        "Non-tensor memory (peak RSS minus the dry run's tensors): "
        + ", ".join(f"{k} {v:.0f} MiB" for k, v in non_tensor.items())
        + f"; the profile's runtime_overhead_mib is {profile.runtime_overhead_mib:.0f}.",
        "",
        f"Baseline: a process importing the runtime, torch, diffusers and peft peaks at {base:.1f} MiB RSS; the "
        "rest is loading, LoRA injection and thread pools. At this scale the tensors are a few MiB, so the "
        "process figure is mostly the profile's constant; `python -m bench.memory_accuracy` checks the tensor "
        "prediction on a larger model.",
        "",
        "## Training",
        "",
        f"{len(log['losses'])} steps, median {median(log['step_seconds']) * 1000:.0f} ms/step, loss "
        f"{mean(log['losses'][:10]):.4f} (first 10) -> {mean(log['losses'][-10:]):.4f} (last 10).",
        "",
        "## Fidelity (blockskip-eval)",
        "",
        f"Prompt `{scores['prompt']}`, seeds {scores['seeds']}, {scores['steps']} Euler steps, guidance "
        f"{scores.get('cfg', 1.0)}, {scores['views']} held-out views.",
        "",
        "| metric | before | after |",
        "|---|---|---|",
    ]
    for k in scores["after"]:
        lines.append(f"| {k} | {scores['before'][k]:.4f} | {scores['after'][k]:.4f} |")
    lines += [
        "",
        "Files: `run/lora.safetensors` (diffusers-named LoRA), `grid.png` (held-out views, samples "
        "before, samples after), `eval.json`, `run/train_log.json`.",
        "",
    ]
    if (out / "run-pte" / "train_log.json").is_file():
        lines += pte_section(out, reports)
    return "\n".join(lines)


def pte_section(out: Path, torch_reports) -> list[str]:
    """The same personalisation on the phone path: ExecuTorch programs, block-streamed span, int8 weights."""
    log = json.loads((out / "run-pte" / "train_log.json").read_text())
    scores = json.loads((out / "eval-pte.json").read_text())
    plan, profile, reports = dry_run(out / "bundle-pte", len(list((out / "photos").glob("*.png"))), fmt="pte")
    train = next(r for r in reports if r.phase == "train")
    lines = [
        "## The phone path: ExecuTorch, block-streamed span, int8 weights",
        "",
        f"The same plan exported with `--format pte --span streamed --storage int8`: {describe(plan)}. "
        f"Precompute and training ran on the `executorch` backend ({log.get('block_backend', 'executorch')} "
        f"block programs, {log.get('weight_file_reads', '?')} block-file reads); the dry run for pte predicts "
        f"{train.tensor_peak / MIB:.1f} MiB of training tensors (torch resident span: "
        f"{next(r for r in torch_reports if r.phase == 'train').tensor_peak / MIB:.1f} MiB); peak RSS "
        f"{log['peak_rss_mib']:.0f} MiB (the Python process with torch and the ExecuTorch runtime; the native "
        f"runner runs the same bundle without them).",
        "",
        f"{len(log['losses'])} steps, median {median(log['step_seconds']) * 1000:.0f} ms/step, loss "
        f"{mean(log['losses'][:10]):.4f} (first 10) -> {mean(log['losses'][-10:]):.4f} (last 10).",
        "",
        "| metric | before | after (pte, streamed, int8) |",
        "|---|---|---|",
    ]
    for k in scores["after"]:
        lines.append(f"| {k} | {scores['before'][k]:.4f} | {scores['after'][k]:.4f} |")
    lines += ["", "Files: `run-pte/lora.safetensors`, `grid-pte.png`, `eval-pte.json`.", ""]
    return lines


def describe(plan) -> str:
    skip = f"n={plan.front_skip}, m={plan.back_skip}" if plan.trained is None else f"trained {plan.trained}"
    return (
        f"{skip}, LoRA rank {plan.lora_rank}, s_min {plan.s_min} / s_max {plan.s_max}, "
        f"{'patch sampling' if plan.patch_sampling else 'resize'}, K={plan.num_samples}, {plan.steps} steps, "
        f"lr {plan.lr:g}"
    )


def median(xs):
    s = sorted(xs)
    return s[len(s) // 2]


def mean(xs):
    return sum(xs) / len(xs)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    out = Path(argv[0])
    text = build(out)
    (out / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
