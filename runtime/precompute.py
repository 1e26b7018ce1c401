"""Precompute on the program backends (numpy only): the cache the trained span reads, from the photos.

Per schedule entry: the entry's crop of the photo's latent resized to s_min (:func:`crop_resize`), its
noise (``rng.normals``), and the bundle's embed program, which noises the crop and embeds it with the
prompt into the state entering block 0, the step constants and the flow-matching target. Then every
block up to the end of the last skipped span runs its shape's forward program with a zero LoRA, one
block's stored weights at a time (the next one read ahead), over a chunk of entries (block-major),
keeping the trained span's exact input and each skipped span's residual (:func:`record_boundary`).

The native runner (``device_train/native/precompute.cpp``) does the same in the same order, so a cache
made by either is the same cache (within float rounding of the programs' kernels).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, TypeVar, cast

import numpy as np

from blockskip.runtime.bundle import Bundle
from blockskip.runtime.cache import ResidualCache
from blockskip.runtime.contract import Arrays
from blockskip.runtime.errors import BundleError, CacheError
from blockskip.runtime.files import atomic_write
from blockskip.runtime.formats import EMBED, TEXT
from blockskip.runtime.memory import peak_rss_mib
from blockskip.runtime.progress import Progress
from blockskip.runtime.rng import normals
from blockskip.runtime.schedule import ScheduleEntry
from blockskip.runtime.stream import CONST, STATE, StreamSpec, WeightSource
from blockskip.runtime.tensorfile import TensorFile, write_tensors


class _Subtractable(Protocol):
    def __sub__(self, other: Any, /) -> Any: ...


Tensor = TypeVar("Tensor", bound=_Subtractable)  # numpy arrays here, torch tensors in the torch backend


class ProgramRunner(Protocol):
    """What precompute needs of a program backend (``runtime.backends.programs.ProgramBackend``)."""

    def run(self, shape: str, role: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...

    def precompute_block(self, shape: str, state: Arrays, consts: Arrays, weights: Arrays) -> Arrays: ...

    def release(self) -> None: ...


def gaps(trained: list[int], num_blocks: int) -> list[tuple[int, int]]:
    """Skipped spans [a, b) after the first trained block (the front span is stored exactly)."""
    out = [(a + 1, b) for a, b in zip(trained, trained[1:]) if b - a > 1]
    if trained[-1] < num_blocks - 1:
        out.append((trained[-1] + 1, num_blocks))
    return out


def residual_gaps(trained: list[int], num_blocks: int, back_residual: bool = True) -> list[tuple[int, int]]:
    """The skipped spans [a, b) after the first trained block whose residual the cache holds."""
    return [(a, b) for a, b in gaps(trained, num_blocks) if back_residual or b != num_blocks]


def blocks_to_run(trained: list[int], num_blocks: int, back_residual: bool = True) -> int:
    """Precompute runs blocks [0, this): up to the first trained block, and on to the end of the last
    skipped span (nothing after the last trained block is needed when there is no back skip, or when
    the back span is dropped rather than replaced by its residual)."""
    g = residual_gaps(trained, num_blocks, back_residual)
    return max(trained[0], g[-1][1] if g else 0)


def record_boundary(
    saved: dict[str, Tensor],
    state: Mapping[str, Tensor | None],
    i: int,
    trained: list[int],
    gap_list: list[tuple[int, int]],
    num_blocks: int,
    before: bool,
    copy: Callable[[Tensor], Tensor] = np.copy,  # type: ignore[assignment]  # (numpy arrays: np.copy)
) -> None:
    """Keep the exact input of the first trained block and the residual of every skipped span
    (``state`` before block ``i`` runs when ``before``, else after it). ``copy`` copies a tensor."""
    if before and i == trained[0]:
        saved.update({f"in.{n}": copy(v) for n, v in state.items() if v is not None})
    for a, b in gap_list:
        if before and i == a:
            saved.update({f"tmp.{a}.{n}": copy(v) for n, v in state.items() if v is not None})
        if not before and i == b - 1:
            # only the hidden residual of the back span reaches the head
            keys = ["hidden"] if b == num_blocks else [n for n, v in state.items() if v is not None]
            for n in keys:
                if f"tmp.{a}.{n}" in saved:
                    # (keys: the states present; the hidden state always is)
                    saved[f"delta.{a}.{n}"] = cast(Tensor, state[n]) - saved[f"tmp.{a}.{n}"]
            for n in [x for x in saved if x.startswith(f"tmp.{a}.")]:
                del saved[n]


# --------------------------------------------------------------------------------------------
# a schedule entry's sample


def area_windows(n_in: int, n_out: int) -> list[tuple[int, int]]:
    """Output ``i`` of an area resize averages inputs ``floor(i n_in / n_out)`` to ``ceil((i + 1) n_in /
    n_out)`` (exclusive), as torch's ``interpolate(mode="area")``."""
    return [((i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)) for i in range(n_out)]


def crop_resize(latent: np.ndarray, e: ScheduleEntry, s_min: int, s_max: int, vae_factor: int) -> np.ndarray:
    """latent [C, L, L] of the s_max photo -> the entry's crop resized to s_min, [1, C, low, low] float32.

    The area resize is separable, in float64: along each row first, then along each column; each output
    is the sum, in input order, of its window's inputs times 1/(window length)."""
    f = vae_factor
    side, top, left, low = e.side // f, e.top // f, e.left // f, s_min // f
    crop = np.asarray(latent[:, top : top + side, left : left + side], dtype=np.float64)
    if side != low:
        win = area_windows(side, low)
        rows = np.empty((crop.shape[0], side, low))
        for o, (a, b) in enumerate(win):
            w = 1.0 / (b - a)
            acc = crop[:, :, a] * w
            for x in range(a + 1, b):
                acc = acc + crop[:, :, x] * w
            rows[:, :, o] = acc
        crop = np.empty((crop.shape[0], low, low))
        for o, (a, b) in enumerate(win):
            w = 1.0 / (b - a)
            acc = w * rows[:, a, :]
            for y in range(a + 1, b):
                acc = acc + w * rows[:, y, :]
            crop[:, o, :] = acc
    return crop.astype(np.float32)[None]


def sample_inputs(latent: np.ndarray, e: ScheduleEntry, s_min: int, s_max: int, vae_factor: int) -> Arrays:
    """The embed program's per-entry inputs: the resized crop ``x0``, its ``noise``, ``sigma`` and
    ``geom`` (float64 [top, left, side] of the crop in latent pixels)."""
    x0 = crop_resize(latent, e, s_min, s_max, vae_factor)
    f = vae_factor
    return {
        "x0": x0,
        "noise": normals(e.noise_seed, x0.size).reshape(x0.shape),
        "sigma": np.array([e.sigma], dtype=np.float32),
        "geom": np.array([e.top // f, e.left // f, e.side // f], dtype=np.float64),
    }


# --------------------------------------------------------------------------------------------
# the loop


def valid_shard(cache: ResidualCache, k: int) -> bool:
    """Shard k is recorded and matches its sha256 (a corrupt one is recomputed)."""
    if not cache.has(k):
        return False
    try:
        cache.path(k)
        return True
    except CacheError:
        return False  # corrupt: recompute it


def precompute(
    bundle: Bundle,
    images: np.ndarray,
    cache_dir: str | Path,
    *,
    source: dict[str, Any],
    backend: ProgramRunner,
    encode: Callable[[np.ndarray], np.ndarray],
    progress: Progress | None = None,
) -> ResidualCache:
    """Write the cache for ``images`` [N, 3, S, S] with a program backend (``runtime.backends.programs``);
    ``encode(images)`` gives the photos' latents [N, C, L, L] (the bundle's encoder programs). Resumes:
    shards already written (and intact) are kept."""
    plan = bundle.plan
    spec = StreamSpec(bundle)
    if EMBED not in spec.shapes:
        raise BundleError(
            f"bundle {bundle.root} has no embed program (it predates native precompute); export it again"
        )
    schedule = bundle.schedule(len(images))
    cache = ResidualCache.create(cache_dir, source=source, schedule=schedule)
    todo = [k for k in range(len(schedule)) if not valid_shard(cache, k)]
    progress = progress or Progress(quiet=True)
    if not todo:
        progress.log(f"cache complete: {len(schedule)} entries in {cache.root}")
        return cache

    trained = bundle.trained
    num_blocks = len(bundle.manifest["model"]["blocks"])
    stop = blocks_to_run(trained, num_blocks, plan.back_residual)
    gap_list = residual_gaps(trained, num_blocks, plan.back_residual)
    order = [(i, s) for i, s in spec.precompute if i < stop]
    if [i for i, _ in order] != list(range(stop)):
        raise BundleError(
            "the bundle's stream section lacks precompute programs for some blocks; export it again"
        )
    f = int(bundle.manifest["vae_factor"])
    latents = encode(images)
    prompt = TensorFile(bundle.path(bundle.manifest["prompt"]))
    embed_file = TensorFile(bundle.path(bundle.manifest["model"]["embed"]))
    consts_in = {TEXT + k: prompt.float32(k) for k in prompt.arrays}
    consts_in.update({"w." + k: embed_file.float32(k) for k in embed_file.arrays})
    chunk = plan.precompute_chunk or len(todo)
    passes = (len(todo) + chunk - 1) // chunk
    bar = progress.bar(len(todo) + passes * stop, "precompute")
    weights = WeightSource(spec, resident=False, prefetch=plan.prefetch)
    try:
        for c0 in range(0, len(todo), chunk):
            ks = todo[c0 : c0 + chunk]
            states, consts, saved = [], [], []
            for k in ks:
                e = schedule[k]
                out = backend.run(
                    EMBED,
                    EMBED,
                    {**consts_in, **sample_inputs(latents[e.image], e, plan.s_min, plan.s_max, f)},
                )
                states.append({n[len(STATE) :]: v for n, v in out.items() if n.startswith(STATE)})
                consts.append({n[len(CONST) :]: v for n, v in out.items() if n.startswith(CONST)})
                saved.append({"target": out["target"]})
            weights.plan([i for i, _ in order])
            for i, sid in order:
                w = weights.get(i)
                for j in range(len(ks)):
                    record_boundary(saved[j], states[j], i, trained, gap_list, num_blocks, before=True)
                    states[j] = backend.precompute_block(sid, states[j], consts[j], w)
                    record_boundary(saved[j], states[j], i, trained, gap_list, num_blocks, before=False)
                del w
                bar.update(1, block=i)
            if stop == trained[0]:  # nothing is skipped after the span: its exact input is all we need
                for j in range(len(ks)):
                    record_boundary(saved[j], states[j], stop, trained, gap_list, num_blocks, before=True)
            for j, k in enumerate(ks):
                tensors = {n: np.ascontiguousarray(v, dtype=np.float32) for n, v in saved[j].items()}
                tensors.update(
                    {f"c.{n}": np.ascontiguousarray(v, dtype=np.float32) for n, v in consts[j].items()}
                )
                atomic_write(
                    cache.root / cache.shard_name(k), functools.partial(write_tensors, tensors=tensors)
                )
                cache.record(k)
                cache.flush()
                bar.update(1, entry=k)
            del states, consts, saved
    finally:
        weights.close()
        backend.release()
    bar.close()
    cache.index["max_resident_blocks"] = 1
    cache.index["peak_rss_mib"] = peak_rss_mib()  # this process's, up to the end of precompute
    cache.flush()
    return cache
