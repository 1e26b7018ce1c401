"""Plan search: the plan with the most trained capacity whose every phase fits the profile budget.

Capacity order (most first): fewer skipped blocks, larger s_min, larger rank, a more precise frozen
base (none > int8 > nf4), no activation checkpointing (it only costs time). Memory falls monotonically
along each axis, so for every (skip, s_min) the cheapest variant is traced first and the pair is
dropped if even that does not fit; otherwise variants are traced in preference order until one fits.

Only plans the format's backend runs are proposed: the program formats (pte, onnx) hold a resident span
in float32 without a quantised base or checkpointing. When no resident plan fits at a split that skips
at most the streamed span's first split (50%), the span is block-streamed: one block's weights at a
time in a storage dtype (bfloat16 > int8 > int4), which every backend runs. A streamed span's memory
hardly depends on rank and storage, so there the most capable variant is traced first: where it fits it
is the only plan traced at its split; else the cheapest decides whether the split can fit at all.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from blockskip.export.families import lora_target_names
from blockskip.export.memory.dryrun import ModelSpec, PhaseReport, dry_run
from blockskip.runtime.backends.torch_families.latent import FIXED_ENCODERS
from blockskip.runtime.errors import PlanError
from blockskip.runtime.plan import Plan

# The paper's FLUX splits (19 double + 38 single blocks), skip ratio -> (n, m).
FLUX_SPLITS = {0.3: (7, 10), 0.4: (13, 10), 0.5: (19, 10)}
RATIOS = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
QUANTS = ("none", "int8", "nf4")


def split_for(num_blocks: int, ratio: float, table: dict | None = None) -> tuple[int, int]:
    """(n, m) for a skip ratio: a selection table's entry, the paper's FLUX split, or the paper's shape
    (back skip ~18% of the blocks, the rest in front) scaled to this model."""
    if table and str(ratio) in table:
        n, m = table[str(ratio)]
        return int(n), int(m)
    if num_blocks == 57 and ratio in FLUX_SPLITS:
        return FLUX_SPLITS[ratio]
    k = round(ratio * num_blocks)
    m = min(k, round(num_blocks * 10 / 57))
    return k - m, m


@dataclass
class Candidate:
    plan: Plan
    reports: list[PhaseReport]
    seconds: float | None = None  # the whole run's predicted time (``dryrun.total_seconds``), if asked for
    max_seconds: float | None = None  # the time budget it must fit too

    @property
    def peak(self) -> int:
        return max(r.peak for r in self.reports)

    @property
    def fits_time(self) -> bool:
        return self.max_seconds is None or (self.seconds is not None and self.seconds <= self.max_seconds)

    @property
    def fits(self) -> bool:
        return all(r.fits for r in self.reports) and self.fits_time

    def worst(self) -> PhaseReport:
        return max(self.reports, key=lambda r: r.peak - r.budget)

    def describe(self) -> str:
        p = self.plan
        if p.span == "streamed":
            return (
                f"skip n={p.front_skip} m={p.back_skip}, s_min={p.s_min}, rank={p.lora_rank}, streamed span, "
                f"{p.storage_dtype} weights" + (", VAE tiling" if p.vae_tiling else "")
            )
        return (
            f"skip n={p.front_skip} m={p.back_skip}, s_min={p.s_min}, rank={p.lora_rank}, "
            f"base={p.base_quant}, checkpointing={'on' if p.checkpointing else 'off'}"
            + (", VAE tiling" if p.vae_tiling else "")
        )


@dataclass
class SearchResult:
    best: Candidate | None
    next_bigger: Candidate | None  # the closest more capable plan that did not fit
    smallest: Candidate | None  # the cheapest plan traced (what the minimum is when nothing fits)
    traced: list[Candidate] = field(default_factory=list)


def evaluate(
    spec: ModelSpec,
    plan: Plan,
    profile,
    num_images: int = 4,
    memo: dict | None = None,
    fmt: str = "torch",
    exact: bool = True,
    skeleton=None,
    delegate: str = "none",
) -> Candidate:
    """The dry run of ``plan`` run by ``fmt``'s backend (a streamed span: ``streamed.streamed_dry_run``;
    ``exact``: pte programs by their planned arenas)."""
    fam = spec.family
    trained = plan.validate(fam.num_blocks, spec.granularity, fam.valid_targets())
    lora = {
        "rank": plan.lora_rank,
        "alpha": plan.alpha,
        "targets": lora_target_names(fam, trained, plan.lora_targets),
    }
    if plan.span == "streamed":
        from blockskip.export.memory.streamed import streamed_dry_run

        return Candidate(
            plan,
            streamed_dry_run(
                spec,
                plan,
                lora,
                profile,
                fmt,
                num_images=num_images,
                exact=exact,
                precompute_memo=memo,
                skeleton=skeleton,
                delegate=delegate,
            ),
        )
    return Candidate(
        plan,
        dry_run(spec, plan, lora, profile, num_images=num_images, precompute_memo=memo, skeleton=skeleton),
    )


QUANT_BYTES = {"int8": 1.0, "nf4": 0.5}  # bytes per Linear weight element, scales left out (a lower bound)


def weights_lower_bound(spec: ModelSpec, plan: Plan, skeleton=None) -> int:
    """Bytes of the trained blocks' and head's weights alone: no plan can need less than this."""
    import torch
    from torch import nn

    model = skeleton if skeleton is not None else spec.family.skeleton()
    esize = torch.empty((), dtype=getattr(torch, plan.dtype)).element_size()
    paths = spec.family.block_paths()
    total = 0.0
    prefixes = [paths[i] for i in plan.trained_indices(len(paths))] + spec.family.head_prefixes
    for prefix in prefixes:
        try:
            mod = model.get_submodule(prefix)
        except AttributeError:  # a bare parameter (e.g. SANA's scale_shift_table)
            total += model.get_parameter(prefix).numel() * esize
            continue
        for sub in mod.modules():
            for name, p in sub.named_parameters(recurse=False):
                q = (
                    QUANT_BYTES.get(plan.base_quant)
                    if isinstance(sub, nn.Linear) and name == "weight"
                    else None
                )
                total += p.numel() * (
                    q if q is not None and not prefix.startswith(("norm_out", "proj_out")) else esize
                )
    return int(total)


STORAGES = ("bfloat16", "int8", "int4")  # a streamed span's frozen weights, most precise first
# A streamed span holds one block at a time, so its memory barely depends on the split: the split is chosen
# for time per step and cache size instead. The search starts at the paper's 50% split (matching full
# LoRA's quality in its FLUX study at half the trained blocks) and skips more only when 50% does not fit;
# fewer skipped blocks are for the user to ask for (-n/-m, --skip-ratio).
STREAMED_RATIOS = (0.5, 0.6, 0.7, 0.8)


def search(
    spec: ModelSpec,
    base: Plan,
    profile,
    *,
    ratios=RATIOS,
    s_mins=None,
    ranks=(16, 4),
    quants=QUANTS,
    checkpointing=(False, True),
    split_table: dict | None = None,
    fmt: str = "torch",
    spans=("resident", "streamed"),
    storages=STORAGES,
    streamed_ratios=STREAMED_RATIOS,
    log=lambda msg: None,
    delegate: str = "none",
    max_seconds: float | None = None,
    photos: int = 4,
) -> SearchResult:
    """The most capable plan ``fmt``'s backend can run inside the profile's budget: a resident span first
    (torch: any frozen base and checkpointing; pte/onnx: float32, unquantised) at splits that skip no more
    than the streamed span's first split, else a block-streamed span. ``max_seconds``: a plan fits only
    if its whole run (``photos`` photos, K samples, the plan's steps) is also predicted within it, so a
    time budget moves the search to more skipped blocks and smaller crops, as memory does."""
    L = spec.family.num_blocks
    s_mins = sorted(set(s_mins or [base.s_min]), reverse=True)
    if fmt != "torch":  # the program formats hold a resident span whole, in float32, unquantised
        quants, checkpointing = tuple(q for q in quants if q == "none"), (False,)
        if fmt == "onnx":  # ONNX Runtime's Python API takes no bfloat16 input: float16 is the same size
            storages = tuple(dict.fromkeys("float16" if st == "bfloat16" else st for st in storages))
        base = dataclasses.replace(base, dtype="float32", base_quant="none", checkpointing=False)

    def split_pairs(rs):
        out: list[tuple[tuple[int, int], float]] = []
        for r in sorted(set(rs)):
            n, m = split_for(L, r, split_table)
            if n + m < L and (n, m) not in [p[0] for p in out]:
                out.append(((n, m), r))
        return out

    result = SearchResult(None, None, None)
    memo: dict = {}
    pruned: set = set()
    # tiled photo encoding: torch tiles any real VAE; the program formats export DC-AE tile programs
    enc = spec.encoder_spec["class"]
    can_tile = enc == "AutoencoderDC" or (fmt == "torch" and enc not in FIXED_ENCODERS)

    def timed(c: Candidate) -> Candidate:
        if max_seconds is not None:
            from blockskip.export.memory.dryrun import timing, total_seconds

            c.seconds, c.max_seconds = (
                total_seconds(timing(c.reports, profile, fmt), c.plan, photos),
                max_seconds,
            )
        return c

    def memory_fits(c: Candidate) -> bool:
        return all(r.fits for r in c.reports)

    def traced(plan: Plan, **ev) -> Candidate:
        """The plan's dry run; when the photo encoder is what breaks the budget, encoded in tiles instead
        (precompute only; training is unchanged)."""
        c = timed(evaluate(spec, plan, profile, memo=memo, fmt=fmt, delegate=delegate, **ev))
        if not memory_fits(c) and c.worst().phase == "precompute" and not plan.vae_tiling and can_tile:
            c = timed(
                evaluate(
                    spec,
                    dataclasses.replace(plan, vae_tiling=True),
                    profile,
                    memo=memo,
                    fmt=fmt,
                    delegate=delegate,
                    **ev,
                )
            )
        result.traced.append(c)
        when = "" if c.seconds is None else f", {c.seconds / 60:.1f} min"
        log(f"  {'fits ' if c.fits else 'over '} {c.peak / 2**30:7.2f} GiB{when}  {c.describe()}")
        return c

    def exact(plan: Plan) -> Candidate:
        """The plan with its programs' planned arenas (the photo encoder's too), tiled if that is what
        the encoder program needs."""
        c = timed(
            evaluate(
                spec, plan, profile, memo=memo, fmt=fmt, exact=True, skeleton=skeleton, delegate=delegate
            )
        )
        if not memory_fits(c) and c.worst().phase == "precompute" and not plan.vae_tiling and can_tile:
            c = timed(
                evaluate(
                    spec,
                    dataclasses.replace(plan, vae_tiling=True),
                    profile,
                    memo=memo,
                    fmt=fmt,
                    exact=True,
                    skeleton=skeleton,
                    delegate=delegate,
                )
            )
        return c

    skeleton = spec.family.skeleton()
    fixed = getattr(profile, "fixed_overhead_bytes", 0)

    def note(c: Candidate) -> None:
        if result.smallest is None or c.peak < result.smallest.peak:
            result.smallest = c

    def trace(**kw) -> Candidate:
        plan = dataclasses.replace(base, trained=None, **kw)
        lb = weights_lower_bound(spec, plan, skeleton)
        if lb + fixed > profile.budget_bytes:  # the weights alone do not fit: no need to trace
            rep = PhaseReport(
                "train",
                {"trained_base": lb},
                lb,
                fixed,
                lb + fixed,
                profile.budget_bytes,
                {"lower_bound": True},
                margin=int(getattr(profile, "safety_margin_mib", 0.0) * 2**20),
            )
            c = Candidate(plan, [rep])
            key = (plan.front_skip, plan.back_skip, plan.s_min, plan.base_quant)
            if key not in pruned:  # one line per split and base: rank and checkpointing do not change it
                pruned.add(key)
                log(
                    f"  over  >{c.peak / 2**30:7.2f} GiB  skip n={plan.front_skip} m={plan.back_skip}, "
                    f"s_min={plan.s_min}, base={plan.base_quant}: the weights alone do not fit"
                )
            return c
        return traced(plan, skeleton=skeleton)

    def trace_streamed(**kw) -> Candidate:
        plan = dataclasses.replace(
            base,
            trained=None,
            span="streamed",
            dtype="float32",
            base_quant="none",
            checkpointing=False,
            optimizer="adamw",
            **kw,
        )
        return traced(plan, exact=False, skeleton=skeleton)

    if "resident" in spans:
        # Preference order within a (split, s_min): base precision, then rank, then no checkpointing. The
        # checkpointed variant is traced first: if even it does not fit, its un-checkpointed twin cannot.
        combos = [(rk, q) for q in quants for rk in sorted(ranks, reverse=True)]
        cheapest_key = (min(ranks), quants[-1], checkpointing[-1])
        res_ratios = ratios
        if "streamed" in spans and storages and streamed_ratios:
            # a resident plan that skips more than a streamed one would trains less: stream instead
            res_ratios = [r for r in ratios if r <= min(streamed_ratios)]
        for (n, m), _ratio in split_pairs(res_ratios):
            for s_min in s_mins:
                cheapest = trace(
                    front_skip=n,
                    back_skip=m,
                    s_min=s_min,
                    lora_rank=min(ranks),
                    base_quant=quants[-1],
                    checkpointing=checkpointing[-1],
                )
                note(cheapest)
                if not cheapest.fits:
                    result.next_bigger = cheapest
                    continue
                for rk, q in combos:
                    fitted = None
                    for ck in reversed(checkpointing):  # most memory-saving first
                        key = (rk, q, ck)
                        c = (
                            cheapest
                            if key == cheapest_key
                            else trace(
                                front_skip=n,
                                back_skip=m,
                                s_min=s_min,
                                lora_rank=rk,
                                base_quant=q,
                                checkpointing=ck,
                            )
                        )
                        if not c.fits:
                            result.next_bigger = c
                            break
                        fitted = c
                    if fitted is not None:
                        result.best = fitted
                        return result
    if "streamed" in spans and storages:
        # within a (split, s_min): storage precision, then rank; the cheapest variant first
        combos = [(rk, st) for st in storages for rk in sorted(ranks, reverse=True)]
        result.next_bigger = None  # a resident plan is not a bigger one
        cheapest_combo = (min(ranks), storages[-1])
        for (n, m), _ratio in split_pairs(streamed_ratios):
            for s_min in s_mins:
                # the most capable variant first: a streamed span's memory hardly depends on rank and
                # storage, so where it fits (the common case) it is the only plan traced at this split
                top = trace_streamed(
                    front_skip=n, back_skip=m, s_min=s_min, lora_rank=combos[0][0], storage=combos[0][1]
                )
                if top.fits and fmt == "pte":
                    top = exact(top.plan)
                if top.fits:
                    result.best = top
                    return result
                note(top)
                cheapest = (
                    top
                    if combos[0] == cheapest_combo
                    else trace_streamed(
                        front_skip=n,
                        back_skip=m,
                        s_min=s_min,
                        lora_rank=cheapest_combo[0],
                        storage=cheapest_combo[1],
                    )
                )
                note(cheapest)
                if not cheapest.fits:
                    result.next_bigger = cheapest
                    continue
                result.next_bigger = top
                for rk, st in combos[1:]:
                    c = (
                        cheapest
                        if (rk, st) == cheapest_combo
                        else trace_streamed(front_skip=n, back_skip=m, s_min=s_min, lora_rank=rk, storage=st)
                    )
                    if (
                        c.fits and fmt == "pte"
                    ):  # check (and report) the plan with its programs' planned arenas
                        c = exact(c.plan)
                    if c.fits:
                        result.best = c
                        return result
                    result.next_bigger = c
    return result


def fixed_axes(
    num_blocks: int,
    *,
    split: tuple[int, int] | None = None,
    s_mins=None,
    rank=None,
    base_quant=None,
    checkpointing=None,
    model: str | None = None,
    span: str | None = None,
    storage: str | None = None,
) -> dict:
    """search() keyword arguments that pin what the user gave (None: leave that axis to the search).
    An unpinned split comes from the model's committed selection table (``blockskip-select``) for the
    ratios it covers."""
    kw: dict = {}
    if split is not None:
        ratio = (split[0] + split[1]) / num_blocks
        kw["ratios"], kw["split_table"] = [ratio], {str(ratio): split}
        kw["streamed_ratios"] = [ratio]
    elif model is not None:
        from blockskip.export.select import load_table
        from blockskip.export.select import split_table as table_splits

        table = load_table(model, num_blocks)
        if table is not None:
            kw["split_table"] = table_splits(table)
            kw["ratios"] = sorted(set(RATIOS) | {float(r) for r in kw["split_table"]})
    if s_mins is not None:
        kw["s_mins"] = list(s_mins)
    if rank is not None:
        kw["ranks"] = (rank,)
    if base_quant is not None:
        kw["quants"] = (base_quant,)
    if checkpointing is not None:
        kw["checkpointing"] = (checkpointing == "on",)
    if span is not None:
        kw["spans"] = (span,)
    if storage is not None:
        kw["storages"] = (storage,)
    if base_quant not in (None, "none") or checkpointing == "on":  # options of the resident torch span
        kw["spans"] = ("resident",)
    return kw


def require_fit(result: SearchResult, profile) -> Candidate:
    if result.best is not None:
        return result.best
    s = result.smallest
    if s is None:
        raise PlanError("no candidate plan is valid for this model; give the split explicitly with -n/-m")
    timed = [
        (c.seconds, c) for c in result.traced if c.seconds is not None and all(r.fits for r in c.reports)
    ]
    if timed:  # plans fit in memory, none in time
        seconds, fast = min(timed, key=lambda t: t[0])
        assert fast.max_seconds is not None  # set with ``seconds``
        raise PlanError(
            f"no plan fits {fast.max_seconds / 60:.1f} minutes on {profile.name}: the fastest traced plan that fits "
            f"in memory ({fast.describe()}) is predicted at {seconds / 60:.1f} min for {fast.plan.steps} steps "
            f"and K={fast.plan.num_samples}; allow more time or ask for fewer --steps / --samples"
        )
    hint = (
        "a smaller s_max (the photos are encoded at s_max)"
        if s.worst().phase == "precompute"
        else "a smaller s_min, or skip more blocks"
    )
    raise PlanError(
        f"no plan fits the {profile.name} budget of {profile.budget_gib:.2f} GiB: the smallest traced plan "
        f"({s.describe()}) needs {s.peak / 2**30:.2f} GiB in its {s.worst().phase} phase; raise the budget or "
        f"use {hint}"
    )
