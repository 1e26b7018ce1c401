"""The training plan: which blocks train, LoRA shape, patch sizes, sample count. Pure data."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from blockskip.runtime.errors import PlanError

BASE_QUANT = ("none", "int8", "nf4")
OPTIMIZERS = ("adamw", "adamw8bit")
SPANS = ("resident", "streamed")
STORAGE = ("float32", "float16", "bfloat16", "int8", "int4")
WEIGHTS = ("streamed", "resident")
STASH = ("memory", "disk")


@dataclass
class Plan:
    front_skip: int = 0  # n: frozen blocks in front; their output is precomputed exactly
    back_skip: int = 0  # m: frozen blocks at the back; replaced by a precomputed residual
    trained: list[int] | None = None  # explicit trained block indices (overrides n and m)
    lora_rank: int = 4  # LoRA rank r: trainable params and optimizer state grow linearly in r
    lora_alpha: float | None = None  # LoRA scale numerator; None means alpha = rank
    lora_targets: list[str] | None = None  # module names inside a block; None = family default
    s_min: int = 64  # training resolution (px); activations scale with s_min^2
    s_max: int = 128  # photo resolution (px); crops grow from s_min to s_max with t
    patch_sampling: bool = True  # False: always the whole photo resized to s_min
    # False (an ablation): the last m blocks are dropped, not replaced by their precomputed residual
    back_residual: bool = True
    positions: str = "crop"  # "crop": positions of the crop in the s_max frame; "native": s_min grid
    dtype: str = "float32"  # base weights, activations and cache dtype
    # frozen base weights of the trained blocks: "none" (plan dtype), "int8" (~1/4 of fp32, ~1/2 of
    # bf16) or "nf4" (4-bit, ~1/7 of fp32); saves trained-span weight memory, costs quantisation error
    # in the frozen base (LoRA still trains in the plan dtype) and dequantise work in every step
    base_quant: str = "none"
    checkpointing: bool = (
        False  # recompute trained-block activations in backward: less memory, ~1/3 more time
    )
    # "streamed": the trained span runs one block at a time (forward sweep keeping each block's input,
    # head, backward sweep of per-block VJP programs that recompute the block): memory ~ one block's
    # weights and activations instead of the whole span's; a second forward per block costs ~1/3 more
    # time. "resident": the whole span is one program / module, as in the paper
    span: str = "resident"
    # frozen weights in the bundle: float32/float16/bfloat16, int8 (per output row) or int4 (groups of
    # up to 64); None = the plan dtype. Fewer bits: a smaller bundle and weight buffers, dequantised in
    # compute (float32); costs quantisation error in the frozen model
    storage: str | None = None
    weights: str = "streamed"  # streamed span: "streamed" re-reads each block's weights (2 blocks resident), "resident" keeps them
    prefetch: bool = True  # read the next block's weights while one runs (a second block buffer)
    stash: str = "memory"  # streamed span: the trained blocks' inputs kept in "memory" or spilled to "disk"
    num_samples: int = 16  # K: precomputed (image, t, crop, noise) draws; cache storage grows in K
    steps: int = 20  # optimizer steps
    grad_accum: int = 1  # micro-steps per optimizer step
    vae_tiling: bool = (
        False  # encode photos in 256 px tiles (real VAEs): precompute memory ~ a tile, not a photo
    )
    optimizer: str = "adamw"  # "adamw8bit" (bitsandbytes): 1/4 of AdamW's state memory, slower on CPU
    lr: float = 1e-4
    weight_decay: float = 1e-4
    timestep_shift: float = 1.0  # sigma = shift*u / (1 + (shift-1)*u), u = t/T (SD3-style shift)
    guidance: float = 3.5  # guidance embedding value for guidance-distilled models (FLUX-dev)
    seed: int = 0
    checkpoint_every: int = 10  # optimizer steps between atomic checkpoints
    precompute_chunk: int = 0  # samples kept in memory per pass over the frozen blocks; 0 = all K
    extra: dict[str, Any] = field(default_factory=dict)

    def trained_indices(self, num_blocks: int) -> list[int]:
        """Validate against a model with ``num_blocks`` blocks; return sorted trained indices."""
        if num_blocks < 1:
            raise PlanError("the model has no transformer blocks")
        if self.trained is not None:
            idx = sorted(set(int(i) for i in self.trained))
            if not idx:
                raise PlanError("--trained is empty: name at least one block index")
            bad = [i for i in idx if i < 0 or i >= num_blocks]
            if bad:
                raise PlanError(
                    f"trained block indices {bad} are out of range: valid are 0..{num_blocks - 1}"
                )
            return idx
        n, m = self.front_skip, self.back_skip
        if n < 0 or m < 0:
            raise PlanError(f"skips must be >= 0 (got front {n}, back {m})")
        if n + m >= num_blocks:
            raise PlanError(
                f"front skip {n} + back skip {m} leaves no block to train: this model has {num_blocks} "
                f"blocks, so n + m must be at most {num_blocks - 1}"
            )
        return list(range(n, num_blocks - m))

    def validate(self, num_blocks: int, granularity: int, valid_targets: set[str] | None = None) -> list[int]:
        idx = self.trained_indices(num_blocks)
        if self.s_min > self.s_max:
            raise PlanError(f"s_min ({self.s_min}) must be <= s_max ({self.s_max})")
        for name in ("s_min", "s_max"):
            v = getattr(self, name)
            if v <= 0 or v % granularity:
                raise PlanError(
                    f"{name} = {v} px is not a positive multiple of this model's patch granularity "
                    f"({granularity} px): try {max(granularity, v // granularity * granularity)}"
                )
        if self.lora_rank < 1:
            raise PlanError(f"LoRA rank must be >= 1 (got {self.lora_rank})")
        for name in ("num_samples", "steps", "grad_accum", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise PlanError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.precompute_chunk < 0:
            raise PlanError("precompute_chunk must be >= 0 (0 means all samples at once)")
        if self.positions not in ("crop", "native"):
            raise PlanError(f"positions must be 'crop' or 'native' (got {self.positions!r})")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise PlanError(f"dtype must be float32, bfloat16 or float16 (got {self.dtype!r})")
        if self.base_quant not in BASE_QUANT:
            raise PlanError(f"base_quant must be one of {', '.join(BASE_QUANT)} (got {self.base_quant!r})")
        if self.optimizer not in OPTIMIZERS:
            raise PlanError(f"optimizer must be one of {', '.join(OPTIMIZERS)} (got {self.optimizer!r})")
        if self.timestep_shift <= 0:
            raise PlanError("timestep_shift must be > 0")
        if self.span not in SPANS:
            raise PlanError(f"span must be one of {', '.join(SPANS)} (got {self.span!r})")
        if self.storage is not None and self.storage not in STORAGE:
            raise PlanError(f"storage must be one of {', '.join(STORAGE)} (got {self.storage!r})")
        if self.weights not in WEIGHTS:
            raise PlanError(f"weights must be one of {', '.join(WEIGHTS)} (got {self.weights!r})")
        if self.stash not in STASH:
            raise PlanError(f"stash must be one of {', '.join(STASH)} (got {self.stash!r})")
        if self.span == "streamed":
            if self.base_quant != "none":
                raise PlanError(
                    "--span streamed dequantises stored weights itself: use --storage int8/int4 "
                    "instead of --base-quant"
                )
            if self.checkpointing:
                raise PlanError(
                    "--span streamed already recomputes each block in its backward; leave out --checkpointing"
                )
            if self.optimizer != "adamw":
                raise PlanError(
                    f"--span streamed trains with AdamW; --optimizer {self.optimizer} is for the "
                    "resident torch span"
                )
        elif self.storage in ("int8", "int4") and self.base_quant != "none":
            raise PlanError(
                "give either --storage int8/int4 (stored weights) or --base-quant (in-memory "
                "quantisation), not both"
            )
        if self.lora_targets is not None and valid_targets is not None:
            unknown = sorted(set(self.lora_targets) - valid_targets)
            if unknown:
                raise PlanError(
                    f"unknown LoRA target(s) {unknown}; valid for this model: {sorted(valid_targets)}"
                )
        return idx

    @property
    def storage_dtype(self) -> str:
        """The frozen weights' storage in the bundle (the plan dtype unless ``storage`` says otherwise)."""
        return self.storage or self.dtype

    @property
    def alpha(self) -> float:
        return float(self.lora_alpha if self.lora_alpha is not None else self.lora_rank)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Plan:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PlanError(f"unknown plan field(s) {unknown}; valid: {sorted(names)}")
        return cls(**d)
