"""``blockskip-export``: model + profile + prompt -> device bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from blockskip.runtime.cli_util import run_cli
from blockskip.runtime.plan import BASE_QUANT, SPANS, STASH, STORAGE, WEIGHTS, Plan

EPILOG = """examples:
  blockskip-export --model tiny --profile desktop-cpu --prompt "a photo of sks cat" -o bundle
  blockskip-export --model tiny --profile desktop-cpu --prompt "a photo of sks cat" --format onnx -o ort-bundle
  blockskip-export --model ./FLUX.1-dev --profile snapdragon8 --front-skip 7 --back-skip 10 \\
      --s-min 256 --s-max 512 --dtype bfloat16 --prompt "a photo of sks dog" -o flux-bundle
"""


def add_plan_args(p: argparse.ArgumentParser) -> None:
    d = Plan()
    g = p.add_argument_group("plan")
    g.add_argument(
        "--front-skip",
        "-n",
        type=int,
        default=None,
        help="frozen blocks in front (precomputed exactly); searched for the profile if not given",
    )
    g.add_argument(
        "--back-skip",
        "-m",
        type=int,
        default=None,
        help="frozen blocks at the back (replaced by a residual); searched if not given",
    )
    g.add_argument(
        "--skip-ratio",
        type=float,
        default=None,
        help="skip this fraction of the blocks, split into n and m by the model's selection table "
        "(blockskip-select; else the paper's shape); instead of -n/-m",
    )
    g.add_argument(
        "--trained",
        type=str,
        default=None,
        help="explicit trained block indices, e.g. 2,3,7 (overrides -n/-m)",
    )
    g.add_argument("--rank", type=int, default=None, help=f"LoRA rank (default {d.lora_rank}, or searched)")
    g.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank)")
    g.add_argument(
        "--targets", type=str, default=None, help="comma-separated LoRA target modules inside a block"
    )
    g.add_argument(
        "--s-min",
        type=int,
        default=None,
        help=f"training resolution in px (default: the model's, e.g. FLUX.1-dev 256; else {d.s_min}; "
        "searched down to half when the default does not fit)",
    )
    g.add_argument(
        "--s-max",
        type=int,
        default=None,
        help=f"photo resolution in px (default: the model's, e.g. FLUX.1-dev 512; else {d.s_max})",
    )
    g.add_argument("--no-patch-sampling", action="store_true", help="always resize the whole photo to s_min")
    g.add_argument(
        "--no-residual",
        action="store_true",
        help="ablation: drop the last m blocks instead of adding their precomputed residual",
    )
    g.add_argument("--positions", choices=["crop", "native"], default=d.positions)
    g.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="weights/activations dtype (default: the model's when stored in bfloat16/float16, else "
        "the profile's; float32 for the program formats and a streamed span)",
    )
    g.add_argument(
        "--checkpointing",
        choices=["on", "off"],
        default=None,
        help="recompute trained-block activations in backward (less memory, ~1/3 more time)",
    )
    g.add_argument(
        "--base-quant",
        choices=list(BASE_QUANT),
        default=None,
        help="frozen base weights of the trained blocks: int8 (~1/4 of fp32) or 4-bit (~1/7); "
        "LoRA trains on top",
    )
    g.add_argument(
        "--span",
        choices=list(SPANS),
        default=None,
        help="streamed: train one block at a time (per-block forward/VJP programs, frozen weights "
        "streamed from storage; memory ~ one block); resident: the whole span at once. "
        "Searched if not given",
    )
    g.add_argument(
        "--storage",
        choices=list(STORAGE),
        default=None,
        help="frozen weights in the bundle: float32/float16/bfloat16, int8 (per row) or int4 "
        "(group-wise); dequantised in compute (default: the plan dtype, or searched)",
    )
    g.add_argument(
        "--weights",
        choices=list(WEIGHTS),
        default=d.weights,
        help="streamed span: re-read each block's weights every sweep (streamed) or keep them (resident)",
    )
    g.add_argument(
        "--no-prefetch", action="store_true", help="streamed weights: do not read the next block ahead"
    )
    g.add_argument(
        "--stash",
        choices=list(STASH),
        default=d.stash,
        help="streamed span: keep the trained blocks' inputs in memory or spill them to disk",
    )
    g.add_argument("--samples", "-K", type=int, default=d.num_samples, help="precomputed samples K")
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum)
    g.add_argument(
        "--vae-tiling",
        action="store_true",
        help="encode photos in 256 px tiles on the device (less precompute memory)",
    )
    g.add_argument(
        "--optimizer",
        choices=["adamw", "adamw8bit"],
        default=d.optimizer,
        help="adamw8bit (bitsandbytes) keeps 1/4 of AdamW's state; slower on CPU",
    )
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--shift", type=float, default=d.timestep_shift, help="timestep shift (SD3-style)")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    g.add_argument("--precompute-chunk", type=int, default=d.precompute_chunk)
    g.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="time budget of the whole run on the profile's device (photos encoded, K samples "
        "precomputed, the steps): the search then also needs the plan's predicted time within it",
    )
    g.add_argument(
        "--photos", type=int, default=4, help="photos the user trains on, for the run's time (default 4)"
    )


def _indices(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        from blockskip.runtime.errors import PlanError

        raise PlanError(
            f"--trained must be comma-separated block indices, e.g. 2,3,7 (got {text!r})"
        ) from None


def plan_from_args(a, profile_dtype: str, defaults: dict | None = None) -> Plan:
    """The plan the options describe; ``defaults``: the model's (``s_min``, ``s_max``, ``dtype``: a known
    config's, or a folder's stored dtype), used where an option is not given."""
    defaults = defaults or {}
    d = Plan()
    dtype = a.dtype or defaults.get("dtype") or profile_dtype
    if dtype not in ("float32", "bfloat16", "float16"):
        dtype = "float32"
    s_max = a.s_max or defaults.get("s_max") or d.s_max
    s_min = a.s_min or min(defaults.get("s_min") or d.s_min, s_max)
    return Plan(
        front_skip=a.front_skip or 0,
        back_skip=a.back_skip or 0,
        checkpointing=a.checkpointing == "on",
        trained=_indices(a.trained),
        lora_rank=a.rank if a.rank is not None else d.lora_rank,
        lora_alpha=a.alpha,
        lora_targets=[t.strip() for t in a.targets.split(",")] if a.targets else None,
        s_min=s_min,
        s_max=s_max,
        patch_sampling=not a.no_patch_sampling,
        back_residual=not a.no_residual,
        positions=a.positions,
        dtype=dtype,
        base_quant=a.base_quant or "none",
        num_samples=a.samples,
        steps=a.steps,
        grad_accum=a.grad_accum,
        lr=a.lr,
        optimizer=a.optimizer,
        vae_tiling=a.vae_tiling,
        timestep_shift=a.shift,
        seed=a.seed,
        checkpoint_every=a.checkpoint_every,
        precompute_chunk=a.precompute_chunk,
        span=a.span or "resident",
        storage=a.storage,
        weights=a.weights,
        prefetch=not a.no_prefetch,
        stash=a.stash,
    )


def model_defaults(model: str) -> dict:
    """The plan defaults of ``--model``: a known config's (``blockskip.export.configs``), the built-in
    model's, or a folder's stored dtype when it is bfloat16/float16 (planned as stored, not widened to the
    profile's float32)."""
    from blockskip.export.memory.specs import KNOWN
    from blockskip.export.tiny import BUILTIN_MODELS

    if model in KNOWN or model in BUILTIN_MODELS:
        from blockskip.export.memory.specs import load_spec

        return dict(load_spec(model)[1])
    folder = Path(model) / "transformer"
    if not folder.is_dir():
        return {}
    from blockskip.export.folder_weights import FolderWeights

    try:
        dt = str(FolderWeights(folder).stored_dtype()).removeprefix("torch.")
    except Exception:  # unreadable shards: the loader says what is wrong
        return {}
    return {"dtype": dt} if dt in ("bfloat16", "float16") else {}


def program_dtype(a, formats) -> str | None:
    """float32 where the plan's backends compute in float32 (the program formats, a streamed span), else
    None; refuses a --dtype they cannot run."""
    from blockskip.runtime.errors import PlanError

    if any(f != "torch" for f in formats) or a.span == "streamed":
        if a.dtype not in (None, "float32"):
            raise PlanError(
                f"--format {','.join(formats)} {'with a streamed span ' if a.span == 'streamed' else ''}"
                f"computes in float32; got --dtype {a.dtype} (use --storage to store the frozen "
                f"weights in fewer bits)"
            )
        return "float32"
    return None


def plan_format(formats, profile) -> str:
    """The format whose backend the dry run models: the phone formats bind over torch (a plan every
    format of the bundle can run). A format the profile's backends do not run is refused."""
    from blockskip.export.memory.streamed import formats_for
    from blockskip.runtime.errors import PlanError

    runs = formats_for(profile)
    foreign = [f for f in formats if f not in runs]
    if foreign:
        raise PlanError(
            f"profile {profile.name}'s backends ({', '.join(profile.backends)}) do not run --format "
            f"{','.join(foreign)}; use {' or '.join(runs) or 'another profile'}"
        )
    return next((f for f in ("pte", "onnx") if f in formats), "torch")


def choose_plan(
    spec, plan: Plan, profile, a, fmt: str = "torch", log=lambda msg: None, on_search=lambda: None
):
    """The profile's plan search over whatever the user did not fix (split, rank, base, checkpointing,
    span, storage, s_min down to half its default), for ``fmt``'s backend: (plan, the chosen candidate or
    None when the options fix the plan, the search result or None). ``blockskip-export`` and
    ``blockskip-plan`` both choose with it; ``on_search`` is called once the options are checked and a
    search starts."""
    import dataclasses

    from blockskip.export.memory.search import fixed_axes, search

    if a.skip_ratio is not None:
        plan = dataclasses.replace(plan, **ratio_split(spec, a))
    fam = spec.family
    plan.validate(fam.num_blocks, spec.granularity, fam.valid_targets())  # refuse bad input first
    fixed_split = (
        a.front_skip is not None
        or a.back_skip is not None
        or a.trained is not None
        or a.skip_ratio is not None
    )
    # a streamed span without --storage leaves the storage to the search (else the bundle would be float32)
    span_fixed = a.span == "resident" or (a.span == "streamed" and a.storage is not None)
    if plan.trained is not None or (
        fixed_split
        and a.rank is not None
        and a.max_minutes is None
        and ((a.base_quant is not None and a.checkpointing is not None) or span_fixed)
    ):
        return plan, None, None  # fully specified (or explicit indices): nothing to search
    s_mins = (
        [a.s_min] if a.s_min else list(dict.fromkeys([plan.s_min, max(spec.granularity, plan.s_min // 2)]))
    )
    kw = fixed_axes(
        fam.num_blocks,
        split=(plan.front_skip, plan.back_skip) if fixed_split else None,
        s_mins=s_mins,
        rank=a.rank,
        base_quant=a.base_quant,
        checkpointing=a.checkpointing,
        model=spec.name,
        span=a.span,
        storage=a.storage,
    )
    on_search()
    result = search(
        spec,
        plan,
        profile,
        fmt=fmt,
        delegate=a.delegate,
        log=log,
        max_seconds=None if a.max_minutes is None else a.max_minutes * 60,
        photos=a.photos,
        **kw,
    )
    if result.best is None:
        return plan, None, result
    p = result.best.plan
    return (
        dataclasses.replace(
            plan,
            front_skip=p.front_skip,
            back_skip=p.back_skip,
            lora_rank=p.lora_rank,
            s_min=p.s_min,
            base_quant=p.base_quant,
            checkpointing=p.checkpointing,
            vae_tiling=p.vae_tiling,
            span=p.span,
            storage=p.storage,
            dtype=p.dtype,
        ),
        result.best,
        result,
    )


def fit_plan(lm, plan: Plan, profile, a, fmt: str = "torch") -> tuple[Plan, dict | None]:
    """``choose_plan`` for the export: the plan, with the chosen plan's predicted peaks for the bundle."""
    import sys

    from blockskip.export.memory.search import evaluate, require_fit

    spec = lm.model_spec()
    plan, best, result = choose_plan(
        spec,
        plan,
        profile,
        a,
        fmt,
        on_search=lambda: print(
            f"fitting the plan to {profile.name} ({fmt}, budget {profile.budget_gib:.2f} GiB) ...",
            file=sys.stderr,
        ),
    )
    if result is not None:
        best = require_fit(result, profile)
        record = memory_record(best, profile, fmt)
        sec = record.get("seconds", {})
        print(
            f"plan: {best.describe()}; predicted peak {best.peak / 2**30:.2f} GiB ("
            + ", ".join(f"{r.phase} {r.peak / 2**30:.2f}" for r in best.reports)
            + f"; budget {profile.budget_gib:.2f} GiB)"
            + (
                f"; predicted time {sec.get('train_per_step', 0):.3g} s a step, "
                f"{sec.get('precompute_per_sample', 0):.3g} s a precomputed sample"
                if sec
                else ""
            )
            + " (written into the bundle's manifest)",
            file=sys.stderr,
        )
        return plan, record
    if plan.trained is None:
        return plan, None
    best = evaluate(spec, plan, profile, fmt=fmt, delegate=a.delegate)  # explicit indices: check them
    if not best.fits:
        w = best.worst()
        print(
            f"warning: --trained plan needs {w.peak / 2**30:.2f} GiB in {w.phase} "
            f"(budget {w.budget / 2**30:.2f} GiB)",
            file=sys.stderr,
        )
    return plan, memory_record(best, profile, fmt)


def export_prediction(lm, plan: Plan, formats, delegate: str = "none"):
    """The dry run of this export (a model folder streamed into torch or pte bundles), else None."""
    from blockskip.export.memory.export_phase import export_dry_run, not_modelled

    if lm.weights is None or not_modelled(plan, formats):
        return None
    from blockskip.runtime.memory import rss_bytes

    return export_dry_run(
        lm.model_spec(), plan, formats, lm.weights.stored_dtype(), libraries=rss_bytes(), delegate=delegate
    )


def memory_record(best, profile=None, fmt: str = "torch") -> dict:
    """The dry run's peaks as the bundle records them (the device checks them before each phase), and
    its time per phase unit when the profile has time figures (the device compares its own)."""
    from blockskip.export.memory.dryrun import timing

    out = {
        "profile_budget_bytes": best.reports[0].budget,
        "phases": {r.phase: int(r.peak) for r in best.reports},
    }
    times = timing(best.reports, profile, fmt)
    if times:
        out["seconds"] = {k: round(v, 6) for k, v in times.items()}
    return out


def ratio_split(lm, a) -> dict:
    """``lm``: a loaded model or a ``ModelSpec`` (its family and name)."""
    """--skip-ratio -> front_skip / back_skip, from the model's committed selection table if it has one."""
    import sys

    from blockskip.export.memory.search import split_for
    from blockskip.export.select import load_table, split_table
    from blockskip.runtime.errors import PlanError

    if a.front_skip is not None or a.back_skip is not None or a.trained is not None:
        raise PlanError("--skip-ratio chooses n and m itself; leave out -n/-m/--trained")
    L = lm.family.num_blocks
    k = round(a.skip_ratio * L)
    if not 0 <= k < L:
        raise PlanError(f"--skip-ratio {a.skip_ratio} skips {k} of {L} blocks; give a ratio in [0, 1)")
    table = load_table(lm.name, L)
    splits = split_table(table) if table else {}
    match = next((r for r in splits if round(float(r) * L) == k), None)
    n, m = splits[match] if match is not None else split_for(L, a.skip_ratio)
    source = (
        f"selection table ratio {match}" if match is not None else "no selection table entry: paper's shape"
    )
    print(f"skip ratio {a.skip_ratio}: n={n}, m={m} of {L} blocks ({source})", file=sys.stderr)
    return {"front_skip": n, "back_skip": m}


def pte_memory_report(bundle_dir) -> str:
    """What the ExecuTorch programs need, read from the bundle: each program's bytes (weights inline)
    plus its memory-planned arena; training also holds the LoRA .ptd."""
    from blockskip.runtime.bundle import Bundle

    b = Bundle(bundle_dir)
    sec = b.manifest["pte"]
    size = {rel: rec["size"] for rel, rec in b.manifest["files"].items()}
    mib = 2**20
    t = sec["train"]
    train = size[t["file"]] + size[t["data"]] + t["arena_bytes"]
    return (
        f"executorch memory (planned, before runtime overhead): training {train / mib:.1f} MiB "
        f"(program {size[t['file']] / mib:.1f} + LoRA {size[t['data']] / mib:.2f} + arena "
        f"{t['arena_bytes'] / mib:.1f})"
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="blockskip-export",
        description="Split a DiT into a device bundle for BlockSkip LoRA training.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (the built-in pretrained model), 'tiny-random' or a local diffusers folder",
    )
    p.add_argument("--profile", default="snapdragon8", help="device profile name or .toml path")
    p.add_argument("--prompt", required=True, help="training prompt, e.g. 'a photo of sks cat'")
    p.add_argument("-o", "--output", required=True, help="bundle folder to write")
    p.add_argument("--force", action="store_true", help="replace an existing bundle")
    p.add_argument(
        "--format",
        default=None,
        help="what to write, comma-separated: torch (safetensors blocks for --backend torch), "
        "onnx (ONNX Runtime training artifacts and per-block ONNX models for --backend ort); "
        "pte (ExecuTorch training program and per-block programs for --backend executorch and "
        "the native runner); default: the first the profile's backends run (desktop-cpu and "
        "Jetson: torch; phones: pte)",
    )
    p.add_argument(
        "--delegate",
        choices=["none", "xnnpack"],
        default="none",
        help="lower the pte programs to XNNPACK (faster on ARM/x86 CPUs)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    add_plan_args(p)
    a = p.parse_args(argv)

    def go():
        from blockskip.export.bundle_writer import (
            DTYPES,
            check_formats,
            check_output,
            check_plan_for,
            export_bundle,
        )
        from blockskip.export.families import load_model
        from blockskip.export.memory.streamed import formats_for
        from blockskip.export.tiny import BUILTIN_MODELS
        from blockskip.runtime.profiles import load_profile

        profile = load_profile(a.profile)
        if a.format is None:
            a.format = (formats_for(profile) or ["torch"])[0]
        formats = check_formats([f.strip() for f in a.format.split(",") if f.strip()])
        fmt = plan_format(formats, profile)  # refuses a format the profile's backends do not run
        # the program formats and a streamed span compute in float32 (fewer bits go to --storage)
        f32 = a.model in BUILTIN_MODELS or program_dtype(a, formats) is not None
        defaults = model_defaults(a.model)
        if f32:
            defaults["dtype"] = "float32"
        plan = plan_from_args(a, "float32" if f32 else profile.dtype, defaults)
        check_plan_for(plan, "", formats, a.delegate)  # what a format refuses, before any work
        import torch

        check_output(Path(a.output), a.force)
        from blockskip.runtime.memory import map_large_allocations

        map_large_allocations()  # what the export frees goes back to the system: its peak is its live tensors'
        # a folder's transformer is read block by block as the bundle is written (never loaded whole)
        lm = load_model(a.model, DTYPES[plan.dtype], seed=plan.seed, stream=True)
        plan, memory = fit_plan(lm, plan, profile, a, fmt)
        predicted = export_prediction(lm, plan, formats, a.delegate)
        if predicted is not None:
            print(
                f"export: predicted peak RSS {predicted.peak / 2**20:.0f} MiB (in its {predicted.stage} stage)",
                file=sys.stderr,
            )
        out = export_bundle(
            lm,
            plan,
            profile,
            a.prompt,
            a.output,
            force=a.force,
            formats=formats,
            log=lambda msg: print(msg, file=sys.stderr),
            delegate=a.delegate,
            memory=memory,
        )
        if "pte" in formats and plan.span == "resident":
            print(pte_memory_report(out), file=sys.stderr)
        n = len(lm.family.block_paths())
        trained = plan.trained_indices(n)
        from blockskip.runtime.memory import peak_rss_mib

        print(
            f"bundle written to {out}  (family {lm.family.name}, {n} blocks, training {trained[0]}..{trained[-1]}"
            f" [{len(trained)}], formats {','.join(formats)}, torch {torch.__version__}; export peak RSS "
            f"{peak_rss_mib():.0f} MiB"
            + ("" if predicted is None else f", predicted {predicted.peak / 2**20:.0f} MiB")
            + ")"
        )

    return run_cli(go, a.debug, "blockskip-export")


if __name__ == "__main__":
    sys.exit(main())
