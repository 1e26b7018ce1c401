"""PatchSchedule: the seeded list of K training draws (numpy only).

For a draw at integer timestep t in [1, T], the crop side grows linearly with t,
``s(t) = s_min + (t/T)(s_max - s_min)``, rounded down to the patch granularity, at a random origin on
the granularity grid; the crop is later resized to ``s_min``. Noise is drawn at ``s_min`` from
``noise_seed``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from blockskip.runtime.errors import PlanError


@dataclass(frozen=True)
class ScheduleEntry:
    index: int  # position in the schedule (= cache entry)
    image: int  # which photo
    t: int  # integer timestep in [1, T]
    sigma: float  # flow-matching noise level in (0, 1]
    side: int  # crop side in px of the s_max photo
    top: int  # crop origin in px
    left: int
    noise_seed: int


def crop_side(t: int, T: int, s_min: int, s_max: int, granularity: int) -> int:
    """``s(t)`` rounded down to the granularity (never below ``s_min``, which is a multiple of it)."""
    s = s_min + (t / T) * (s_max - s_min)
    return max(s_min, int(s // granularity) * granularity)


def shift_sigma(u: float, shift: float) -> float:
    # clamp: 1 + (shift - 1) can round below shift, giving 1.0000000000000002 at u = 1
    return min(1.0, shift * u / (1.0 + (shift - 1.0) * u))


class PatchSchedule:
    def __init__(self, entries: list[ScheduleEntry], meta: dict):
        self.entries = entries
        self.meta = meta

    @classmethod
    def build(
        cls,
        *,
        num_images: int,
        num_samples: int,
        s_min: int,
        s_max: int,
        granularity: int,
        seed: int,
        patch_sampling: bool = True,
        shift: float = 1.0,
        T: int = 1000,
    ) -> PatchSchedule:
        if num_images < 1:
            raise PlanError("the schedule needs at least one image")
        if not (0 < s_min <= s_max) or s_min % granularity or s_max % granularity:
            raise PlanError(f"need 0 < s_min <= s_max, both multiples of {granularity} (got {s_min}, {s_max})")
        rng = np.random.default_rng(seed)
        entries = []
        for k in range(num_samples):
            image = int(k % num_images) if k < num_images else int(rng.integers(num_images))
            t = int(rng.integers(1, T + 1))
            side = crop_side(t, T, s_min, s_max, granularity) if patch_sampling else s_max
            slots = (s_max - side) // granularity + 1
            top = int(rng.integers(slots)) * granularity
            left = int(rng.integers(slots)) * granularity
            entries.append(
                ScheduleEntry(
                    index=k,
                    image=image,
                    t=t,
                    sigma=float(shift_sigma(t / T, shift)),
                    side=side,
                    top=top,
                    left=left,
                    noise_seed=int(rng.integers(2**31 - 1)),
                )
            )
        meta = dict(
            num_images=num_images, s_min=s_min, s_max=s_max, granularity=granularity, seed=seed,
            patch_sampling=patch_sampling, shift=shift, T=T, resize="area",
        )
        return cls(entries, meta)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> ScheduleEntry:
        return self.entries[i]

    def to_json(self) -> dict:
        return {"meta": self.meta, "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_json(cls, d: dict) -> PatchSchedule:
        return cls([ScheduleEntry(**e) for e in d["entries"]], dict(d["meta"]))
