"""``blockskip-plan``: predict every device phase's peak memory and pick a plan that fits a profile."""

from __future__ import annotations

import argparse
import json
import sys
import time

from blockskip.export.cli import add_plan_args, choose_plan, plan_from_args, program_dtype
from blockskip.runtime.cli_util import run_cli

EPILOG = """examples:
  blockskip-plan --model flux-dev --profile snapdragon8            # search the best fitting plan
  blockskip-plan --model flux-dev --profile snapdragon8 --format pte -n 19 -m 10 --storage int8
  blockskip-plan --model flux-dev --profile jetson-orin-nx-16gb -n 19 -m 10 --rank 16 --json
  blockskip-plan --model sana-1.6b --profile snapdragon8 --plot sana.png
  blockskip-plan --model ./my-diffusers-folder --profile desktop-cpu --no-search -n 2 -m 2
Any plan option you give is fixed; the search chooses the others."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="blockskip-plan",
        description="Predict every device phase's peak memory (no weights, nothing allocated) and pick a plan that fits a profile.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="flux-dev",
        help="tiny | tiny-random | flux-dev | sd3-medium | sd35-medium | sana-1.6b | a local diffusers folder",
    )
    p.add_argument("--profile", default="snapdragon8", help="device profile name or .toml path")
    p.add_argument(
        "--format",
        choices=["torch", "pte", "onnx"],
        help="the backend that will run the plan: torch, pte (ExecuTorch / the native runner) or onnx "
        "(ONNX Runtime); default: the first the profile's backends run. Only plans that format "
        "can run are proposed",
    )
    p.add_argument(
        "--delegate",
        choices=["none", "xnnpack"],
        default="none",
        help="pte: the programs lowered to XNNPACK, as blockskip-export --delegate xnnpack writes them",
    )
    add_plan_args(p)  # the very plan options blockskip-export takes: one definition
    p.add_argument(
        "--calibrate",
        nargs="?",
        const="calibrated.toml",
        metavar="FILE.toml",
        help="measure this machine's matmul throughput, memory bandwidth and eager-op overhead (a few "
        "seconds) and write them into a copy of --profile (default desktop-cpu) at FILE.toml "
        "(default ./calibrated.toml); then plan with --profile FILE.toml",
    )
    p.add_argument("--no-search", action="store_true", help="evaluate exactly the given plan")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of the breakdown against the budget")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)
    if a.calibrate is not None:
        return run_cli(lambda: _calibrate(a), a.debug, "blockskip-plan")
    return run_cli(lambda: _run(a), a.debug, "blockskip-plan")


def _calibrate(a) -> int:
    """``--calibrate``: this machine's figures into a copy of the profile's TOML."""
    import re
    from pathlib import Path

    from blockskip.export.memory.cost import calibrate
    from blockskip.runtime.profiles import load_profile, parse_profile

    src = load_profile(a.profile if a.profile != "snapdragon8" else "desktop-cpu")
    text = Path(src.source).read_text() if Path(src.source).is_file() else None
    if text is None:
        from importlib import resources

        text = (resources.files("blockskip.profiles") / f"{src.name}.toml").read_text()
    print(f"calibrating this machine (profile {src.name} as the base) ...", file=sys.stderr)
    fig = calibrate(log=lambda m: print(m, file=sys.stderr))
    name = f"{src.name}-calibrated"
    text = re.sub(r"(?m)^name\s*=.*$", f'name = "{name}"', text, count=1)
    text = re.sub(
        r"(?m)^bandwidth_gbs\s*=.*$",
        f"bandwidth_gbs = {fig['bandwidth_gbs']}  # measured: "
        "blockskip-plan --calibrate (torch copy, bytes read + written)",
        text,
        count=1,
    )
    # drop earlier time tables, then append the measured ones
    text = re.sub(r"(?ms)^\[compute\.(throughput|op_overhead_us)\].*?(?=^\[|\Z)", "", text)
    rates = ", ".join(f"{k} = {v}" for k, v in fig["throughput"]["cpu"].items())
    peak = ", ".join(f"{k} {v}" for k, v in fig["peak"]["cpu"].items())
    text = text.replace(
        "[compute.dtypes]",
        "[compute.throughput]\n# measured: blockskip-plan --calibrate (GFLOP/s a LoRA training step "
        f"sustains: {fig['efficiency']:.0%} of the matmul peak, {peak})\ncpu = {{ {rates} }}\n\n"
        "[compute.op_overhead_us]\n# measured: blockskip-plan --calibrate (eager torch: per op of "
        f"a small LoRA training step)\ntorch = {fig['op_overhead_us']['torch']}\n"
        f"program = {_program_overhead(src)}\n\n[compute.dtypes]",
        1,
    )
    out = Path(a.calibrate)
    parse_profile(text, str(out))  # what is written loads
    out.write_text(text)
    print(f"wrote {out} (profile {name}); plan with --profile {out}", file=sys.stderr)
    return 0


def _program_overhead(profile) -> float:
    """The program runtimes' per-op overhead is not measured by ``--calibrate``: the base profile's."""
    return profile.op_overhead_us.get("program", 1.0)


def _run(a) -> int:
    t0 = time.time()
    from blockskip.export.memory.report import plot, table
    from blockskip.export.memory.search import evaluate, require_fit
    from blockskip.export.memory.specs import load_spec
    from blockskip.export.memory.streamed import bundle_bytes, formats_for
    from blockskip.runtime.errors import PlanError
    from blockskip.runtime.profiles import load_profile

    profile = load_profile(a.profile)
    runs = formats_for(profile)
    if not runs:
        raise PlanError(f"profile {profile.name} lists no backend that runs a bundle format")
    fmt = a.format or runs[0]
    if fmt not in runs:
        raise PlanError(
            f"profile {profile.name}'s backends ({', '.join(profile.backends)}) do not run --format "
            f"{fmt}; use --format {' or '.join(runs)}"
        )
    spec, defaults = load_spec(a.model)
    if a.model not in ("tiny", "tiny-random"):
        from blockskip.export.cli import model_defaults

        defaults = {**model_defaults(a.model), **defaults}
    f32 = program_dtype(a, [fmt]) is not None
    if f32:
        defaults["dtype"] = "float32"
    if fmt != "torch" and (
        a.base_quant not in (None, "none") or a.checkpointing == "on" or a.optimizer != "adamw"
    ):
        raise PlanError(
            f"--base-quant, --checkpointing on and --optimizer adamw8bit are options of the torch "
            f"backend; --format {fmt} runs a float32 resident span or a streamed one (--storage)"
        )
    base = plan_from_args(a, "float32" if f32 else profile.dtype, defaults)
    s_max = base.s_max
    say = (lambda m: None) if a.json else (lambda m: print(m, file=sys.stderr))
    result = None
    if a.no_search:
        if a.skip_ratio is not None:
            import dataclasses

            from blockskip.export.cli import ratio_split

            base = dataclasses.replace(base, **ratio_split(spec, a))
        best, nxt = evaluate(spec, base, profile, fmt=fmt, delegate=a.delegate), None
    else:
        plan, best, result = choose_plan(
            spec,
            base,
            profile,
            a,
            fmt,
            log=say,
            on_search=lambda: say(
                f"searching plans for {a.model} on {profile.name} ({fmt}, budget {profile.budget_gib:.2f} GiB) ..."
            ),
        )
        if result is None:  # the options fix the plan
            best, nxt = evaluate(spec, plan, profile, fmt=fmt, delegate=a.delegate), None
        else:
            best, nxt = require_fit(result, profile), result.next_bigger
    # K: as many samples as the storage budget holds (up to the wanted number)
    entry = best.reports[0].extra["cache_entry_bytes"]
    k_fit = max(1, int(profile.cache_budget_bytes // max(entry, 1)))
    K = min(a.samples, k_fit)
    best.plan.num_samples = K
    from blockskip.export.memory.dryrun import timing, total_seconds

    times = timing(best.reports, profile, fmt)
    out = {
        "model": a.model,
        "profile": profile.name,
        "format": fmt,
        "budget_bytes": profile.budget_bytes,
        "plan": best.plan.to_dict(),
        "fits": best.fits,
        "phases": [r.to_dict() for r in best.reports],
        "predicted_seconds": {**times, "total": total_seconds(times, best.plan, a.photos), "photos": a.photos}
        if times
        else None,
        "cache": {
            "entry_bytes": entry,
            "samples": K,
            "storage_bytes": entry * K,
            "storage_budget_bytes": profile.cache_budget_bytes,
        },
        "next_bigger": None
        if nxt is None
        else {"plan": nxt.plan.to_dict(), "phase": nxt.worst().phase, "peak_bytes": nxt.peak},
        "bundle_weights_bytes": bundle_bytes(spec, best.plan),
        "export": _export(a.model, spec, best.plan, fmt),
        "traced_plans": 1 if result is None else len(result.traced),
        "seconds": round(time.time() - t0, 1),
    }
    if a.plot:
        plot(best.reports, a.plot, f"{a.model} on {profile.name}: {best.describe()}")
    if a.json:
        print(json.dumps(out, indent=1))
        return 0 if best.fits else 3
    L = spec.family.num_blocks
    n, m = best.plan.front_skip, best.plan.back_skip
    bp = best.plan
    print(
        f"\n{a.model} on {profile.name} ({fmt}): {'fits' if best.fits else 'DOES NOT FIT'} "
        f"({L} blocks, {bp.dtype}, s_max {s_max})"
    )
    how = (
        f"streamed span, {bp.storage_dtype} frozen weights ({'prefetched' if bp.prefetch else 'no prefetch'}, "
        f"stash in {bp.stash})"
        if bp.span == "streamed"
        else f"frozen base {bp.base_quant}, checkpointing {'on' if bp.checkpointing else 'off'}"
    )
    print(
        f"plan: skip n={n} m={m} ({(n + m) / L:.0%}: training {L - n - m} blocks), s_min {bp.s_min}, "
        f"LoRA rank {bp.lora_rank}, {how}" + (", VAE tiling on" if bp.vae_tiling else "")
    )
    print(table(best.reports))
    if times:
        from blockskip.export.memory.cost import engine_for

        print(
            f"time (predicted, {profile.name} {engine_for(fmt, profile)} roofline): precompute "
            f"{_dur(times.get('precompute_per_photo', 0))} a photo + {_dur(times.get('precompute_per_sample', 0))} "
            f"a sample; train {_dur(times.get('train_per_step', 0))} a step; {a.photos} photos, K={K}, "
            f"{bp.steps} steps: {_dur(out['predicted_seconds']['total'])}"
        )
    else:
        print(
            f"time: profile {profile.name} has no [compute.throughput] figures (blockskip-plan --calibrate)"
        )
    print(
        f"cache: {K} samples x {entry / 2**20:.1f} MiB = {entry * K / 2**30:.2f} GiB "
        f"(storage budget {profile.cache_budget_gib:.1f} GiB{', caps K' if k_fit < a.samples else ''})"
    )
    print(
        f"bundle: {out['bundle_weights_bytes'] / 2**30:.2f} GiB of block and head weights "
        f"({bp.storage_dtype})"
    )
    if out["export"] is not None:
        e = out["export"]
        print(
            f"export (blockskip-export on the desktop, streaming a {e['weights_dtype']} folder): predicted peak RSS "
            f"{e['peak'] / 2**30:.2f} GiB, in its {e['stage']} stage"
        )
    if nxt is not None:
        w = nxt.worst()
        print(
            f"next bigger plan ({nxt.describe()}) does not fit: its {w.phase} phase needs "
            f"{w.peak / 2**30:.2f} GiB > {w.budget / 2**30:.2f} GiB"
        )
    if a.plot:
        print(f"chart: {a.plot}")
    n = out["traced_plans"]
    print(f"({n} plan{'' if n == 1 else 's'} traced in {out['seconds']} s, no memory allocated)")
    return 0 if best.fits else 3


def _dur(sec: float) -> str:
    if sec < 1:
        return f"{sec * 1000:.0f} ms"
    if sec < 120:
        return f"{sec:.1f} s"
    if sec < 7200:
        return f"{sec / 60:.1f} min"
    return f"{sec / 3600:.1f} h"


def _export(model: str, spec, plan, fmt: str) -> dict | None:
    """The export phase's dry run for the plan's bundle streamed from a model folder (torch and pte
    bundles; a known config's weights as released, in bfloat16). None for the built-in models (in memory,
    nothing streamed) and what the export dry run does not model (``not_modelled``)."""
    from pathlib import Path

    import torch

    from blockskip.export.memory.export_phase import export_dry_run, not_modelled

    if not_modelled(plan, [fmt]) or model in ("tiny", "tiny-random"):
        return None
    from blockskip.export.memory.specs import KNOWN

    dtype = torch.bfloat16
    if model not in KNOWN:
        from blockskip.export.folder_weights import FolderWeights

        dtype = FolderWeights(Path(model) / "transformer").stored_dtype()
    r = export_dry_run(spec, plan, [fmt], dtype)
    return {**r.to_dict(), "weights_dtype": str(dtype).removeprefix("torch.")}


if __name__ == "__main__":
    sys.exit(main())
