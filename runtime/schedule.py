"""PatchSchedule: the seeded list of K training draws (numpy only).

For a draw at integer timestep t in [1, T], the crop side grows linearly with t,
``s(t) = s_min + (t/T)(s_max - s_min)``, rounded down to the patch granularity, at a random origin on
the granularity grid; the crop is later resized to ``s_min``. Noise is drawn at ``s_min`` from
``noise_seed``.

Every draw comes from the counter-based generator of ``runtime.rng`` (``splitmix64-v1``), so the
native runner computes the same schedule: entry k reads words ``5k .. 5k+4`` of
``key(seed, SCHEDULE_STREAM)``: the photo (``below(w0, num_images)``; the first ``num_images`` entries
take each photo once, in order), the timestep ``1 + below(w1, T)``, the crop origin's grid slots
``below(w2, slots)`` (top) and ``below(w3, slots)`` (left), and ``noise_seed = w4 >> 33``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from blockskip.runtime import rng as counter_rng
from blockskip.runtime.errors import PlanError

RNG = "splitmix64-v1"
WORDS_PER_ENTRY = 5


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
    def __init__(self, entries: list[ScheduleEntry], meta: dict[str, Any]):
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
        rng: str = RNG,
    ) -> PatchSchedule:
        if num_images < 1:
            raise PlanError("the schedule needs at least one image")
        if not (0 < s_min <= s_max) or s_min % granularity or s_max % granularity:
            raise PlanError(
                f"need 0 < s_min <= s_max, both multiples of {granularity} (got {s_min}, {s_max})"
            )
        if rng != RNG:
            raise PlanError(
                f"the schedule's generator {rng!r} is not this runtime's ({RNG}); export the bundle again"
            )
        k_sched = counter_rng.key(seed, counter_rng.SCHEDULE_STREAM)
        entries = []
        for k in range(num_samples):
            w = [int(x) for x in counter_rng.words(k_sched, WORDS_PER_ENTRY * k, WORDS_PER_ENTRY)]
            image = k % num_images if k < num_images else int(counter_rng.below(w[0], num_images))
            t = 1 + int(counter_rng.below(w[1], T))
            side = crop_side(t, T, s_min, s_max, granularity) if patch_sampling else s_max
            slots = (s_max - side) // granularity + 1
            top = int(counter_rng.below(w[2], slots)) * granularity
            left = int(counter_rng.below(w[3], slots)) * granularity
            entries.append(
                ScheduleEntry(
                    index=k,
                    image=image,
                    t=t,
                    sigma=float(shift_sigma(t / T, shift)),
                    side=side,
                    top=top,
                    left=left,
                    noise_seed=w[4] >> 33,
                )
            )
        meta = dict(
            num_images=num_images,
            s_min=s_min,
            s_max=s_max,
            granularity=granularity,
            seed=seed,
            patch_sampling=patch_sampling,
            shift=shift,
            T=T,
            resize="area",
            rng=RNG,
        )
        return cls(entries, meta)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> ScheduleEntry:
        return self.entries[i]

    def to_json(self) -> dict[str, Any]:
        return {"meta": self.meta, "entries": [asdict(e) for e in self.entries]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> PatchSchedule:
        return cls([ScheduleEntry(**e) for e in d["entries"]], dict(d["meta"]))
