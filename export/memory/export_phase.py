"""The dry run of the export itself: the whole-process peak of ``blockskip-export`` streaming a model folder.

The streaming export (``bundle_writer.export_bundle`` over ``folder_weights.FolderStore``) goes through
these stages, and its peak is the largest:

* ``blocks``: each block the bundle needs is read from its shard as stored (bfloat16 for released
  checkpoints) and converted to the storage layout, the weights quantised a row chunk at a time
  (``torch_stream.quantise``); the block is dropped before its storage copy is written.
* ``embed``: the embed tensors are read in the plan dtype, the largest one converted from its stored copy
  (SD3's 906 MiB position table).
* ``kept``: the parts kept to the end: the photo encoder's float32 weights, the embed tensors, the initial
  LoRA, the prompt. A ``torch`` bundle has no programs: this is its last stage.
* ``programs``: the kept parts while each stream program is lowered (``LOWERING_BYTES``).
* ``encoder``: the kept parts while the photo encoder program is lowered, last: its weights are program
  constants, copied into the serialised program and the buffer it is written from, and with XNNPACK
  into its delegate blob (``ENCODER_COPIES``), on top of what each earlier lowering left behind
  (``LOWERING_RESIDUE_BYTES`` a program).

Everything is computed from the model's structure (its meta skeleton), no weights read, on top of the
process before the export starts (the interpreter, torch, diffusers, the VAE module): ``blockskip-export``
measures it, ``blockskip-plan`` takes ``LIBRARIES_BYTES``. The other constants are measured; they come
from ``blockskip-export`` runs of random-weight FLUX.1-dev, SD3.5-medium and SANA-1.6B folders
(``python -m bench.random_folder``) with the peak RSS sampled between its progress lines. Not modelled
(``not_modelled``): the ONNX lowering, which runs its programs on real example inputs, and a resident
span's training program (pte), traced on the trained span loaded whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from blockskip.export.memory.dryrun import ModelSpec
from blockskip.export.memory.streamed import _nbytes
from blockskip.runtime.backends import torch_stream as ts
from blockskip.runtime.backends.torch_families.base import tensor_names
from blockskip.runtime.plan import Plan
from blockskip.runtime.precompute import blocks_to_run

MIB = 2**20
#: the process before the export starts, where the export cannot measure it (``blockskip-plan``):
#: 480-530 MiB measured
LIBRARIES_BYTES = 500 * MIB
#: one stream program's lowering (torch.export, to_edge, memory planning, serialisation, on fake inputs)
#: above the kept parts, with what the lowerings before it left behind: 80-125 MiB measured
LOWERING_BYTES = 130 * MIB
#: what one program's lowering leaves behind, alive after it returns (``gc.collect`` and ``malloc_trim`` free
#: none of it): the encoder is lowered after every stream program and sits on all of theirs. 70-120 MiB
#: measured after FLUX.1-dev's 5 and SANA-1.6B's 4 programs, about 300 after SD3.5-medium's 9 (whose export
#: measured 2300 MiB against 2112 predicted with a flat 120, and 2396 in a later run of the same plan,
#: -5.1% with 30 MiB a program): the largest measured per program, 33 MiB, with a little margin
LOWERING_RESIDUE_BYTES = 36 * MIB
#: quantising a weight's row chunk: the float32 chunk, its quotient, rounded and clamped copies, and the
#: allocator's cached frees (94 MiB measured over the block and its storage copy, FLUX.1-dev)
QUANTISE_BYTES = 6 * 4 * ts.CHUNK
#: copies of the photo encoder's weights while its program is lowered, by pte delegate: the serialised
#: program and the buffer it is written from; XNNPACK also packs them into its delegate blob (2.9x
#: measured, SANA-1.6B's 552 MiB DC-AE encoder)
ENCODER_COPIES = {"none": 2, "xnnpack": 3}

PROGRAM_FORMATS = ("pte",)


@dataclass
class ExportReport:
    """Predicted whole-process peak of the export, and the stages it is the largest of (bytes)."""

    peak: int
    stages: dict[str, int]
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def stage(self) -> str:
        return max(self.stages, key=lambda s: self.stages[s])

    def to_dict(self) -> dict:
        return {"peak": self.peak, "stage": self.stage, "stages": self.stages, "parts": self.parts}


def _tensor_bytes(module: nn.Module, names, dtype: torch.dtype | None) -> int:
    """Bytes of the named tensors of a meta module, floating ones in ``dtype`` (None: as they are)."""
    shapes: dict[str, torch.Tensor] = dict(list(module.named_parameters()) + list(module.named_buffers()))
    total = 0
    for n in names:
        t = shapes[n]
        dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
        total += t.numel() * torch.empty((), dtype=dt).element_size()
    return total


def _lora_bytes(skeleton: nn.Module, targets: list[str], rank: int) -> int:
    total = 0
    for name in targets:
        # a LoRA target is a linear layer (get_submodule is typed as any Module)
        mod = cast(nn.Linear, skeleton.get_submodule(name))
        total += rank * (mod.in_features + mod.out_features) * 4
    return total


def _encoder_bytes(encoder_spec: dict) -> int:
    from blockskip.runtime.backends.torch_families.latent import ENCODER_PREFIXES, build_encoder_skeleton

    enc = build_encoder_skeleton(encoder_spec)
    return _tensor_bytes(enc, tensor_names(enc, ENCODER_PREFIXES[encoder_spec["class"]]), torch.float32)


def _block_bytes(fam, sk: nn.Module, i: int, storage: str, weights_dtype: torch.dtype) -> tuple[int, int]:
    """(bytes read and not kept, bytes of the storage copy) of block i. The storage conversion keeps a read
    tensor itself where it changes nothing: a Linear/Conv weight in a float storage of the folder's dtype,
    any other tensor of a float32 folder (``torch_stream.store_tensors``); those count once, as stored."""
    path = fam.block_paths()[i]
    block = sk.get_submodule(path)
    weights = {
        f"{n}.weight" if n else "weight"
        for n, mod in block.named_modules()
        if isinstance(mod, nn.Linear | nn.Conv2d)
    }
    kept_weights = ts.FLOAT_STORAGE.get(storage) == weights_dtype
    read = 0
    for n, t in list(block.named_parameters()) + list(block.named_buffers()):
        if (n in weights and kept_weights) or (
            n not in weights and (weights_dtype == torch.float32 or not t.is_floating_point())
        ):
            continue
        read += _tensor_bytes(block, [n], weights_dtype)
    return read, _nbytes(ts.block_specs(fam, sk, i, storage))


def stream_program_count(fam, trained: list[int], targets: list[str], stop: int, plan: Plan) -> int:
    """The programs a bundle's stream section lowers (``bundle_writer.stream_section``): each block shape's
    forward (and VJP, streamed), the head's and the embed program (streamed)."""
    from blockskip.export.stream_export import stream_layout

    layout = stream_layout(fam, trained, targets, stop)
    if plan.span != "streamed":
        return len(layout.shapes)
    return sum(len(shape.roles) for shape in layout.shapes.values()) + 2


def not_modelled(plan: Plan, formats) -> str | None:
    """Why the export of ``plan`` in ``formats`` has no prediction, or None when it has one."""
    if "onnx" in formats:
        return "the ONNX lowering runs its programs on real inputs"
    if plan.span == "resident" and any(f in PROGRAM_FORMATS for f in formats):
        return "a resident span's training program is traced on the loaded span (use --span streamed)"
    return None


def export_dry_run(
    spec: ModelSpec,
    plan: Plan,
    formats=("torch",),
    weights_dtype: torch.dtype = torch.bfloat16,
    lora_targets: list[str] | None = None,
    skeleton=None,
    libraries: int | None = None,
    delegate: str = "none",
) -> ExportReport:
    """Predict the whole-process peak of exporting ``plan``'s bundle in ``formats`` from a model folder whose
    transformer shards hold ``weights_dtype``. ``libraries``: the process's RSS before the export (measured
    by the export itself; else ``LIBRARIES_BYTES``)."""
    from blockskip.export.families.base import lora_target_names
    from blockskip.runtime.backends.torch_io import DTYPES
    from blockskip.runtime.errors import PlanError

    why = not_modelled(plan, formats)
    if why:
        raise PlanError(f"the export's memory is not predicted for this bundle: {why}")
    fam = spec.family
    sk = skeleton if skeleton is not None else fam.skeleton()
    trained = plan.validate(fam.num_blocks, spec.granularity, fam.valid_targets())
    storage = plan.storage_dtype
    stop = blocks_to_run(trained, fam.num_blocks, plan.back_residual)
    read, stored = max(
        (_block_bytes(fam, sk, i, storage, weights_dtype) for i in sorted(set(range(stop)) | set(trained))),
        key=sum,
    )
    blocks = read + stored + (QUANTISE_BYTES if storage in ("int8", "int4") else 0)
    targets = lora_targets or lora_target_names(fam, trained, plan.lora_targets)
    dtype = DTYPES[plan.dtype]
    parts = {
        "encoder": _encoder_bytes(spec.encoder_spec),
        "embed": _tensor_bytes(sk, tensor_names(sk, fam.embed_prefixes), dtype),
        "lora": _lora_bytes(sk, targets, plan.lora_rank),
        "prompt": sum(_nbytes({k: (s, dtype)}) for k, s in spec.prompt_shapes.items()),
    }
    kept = sum(parts.values())
    embed_names = tensor_names(sk, fam.embed_prefixes)
    # reading an embed tensor in another dtype than stored holds both copies for a moment
    convert = (
        max((_tensor_bytes(sk, [n], weights_dtype) for n in embed_names), default=0)
        if weights_dtype != dtype
        else 0
    )
    stages = {"blocks": blocks, "embed": parts["embed"] + convert, "kept": kept}
    if any(f in PROGRAM_FORMATS for f in formats):
        stages.update(
            programs=kept + LOWERING_BYTES,
            encoder=kept
            + ENCODER_COPIES[delegate] * parts["encoder"]
            + LOWERING_RESIDUE_BYTES * stream_program_count(fam, trained, targets, stop, plan),
        )
    base = LIBRARIES_BYTES if libraries is None else int(libraries)
    stages = {k: base + v for k, v in stages.items()}
    return ExportReport(
        max(stages.values()), stages, {"libraries": base, "block_read": read, "block_stored": stored, **parts}
    )
