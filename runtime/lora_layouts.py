"""LoRA file layouts: the diffusers/peft naming training writes, kohya's and ComfyUI's, in numpy.

``diffusers`` (what ``device-train`` writes): ``transformer.<module>.lora_A.weight`` / ``.lora_B.weight``,
B already scaled by alpha/rank, one pair per diffusers Linear.

The two others name the family's *original* checkpoint (BFL's FLUX, Stability's MMDiT, NVIDIA's Sana),
where q, k, v (and FLUX's single-block MLP input) are one fused Linear. A LoRA on the parts becomes one
LoRA on the fused Linear: the A matrices stacked (rank = parts x rank) and B block-diagonal, which is
exactly the sum of the parts' deltas. A part the LoRA does not cover gets zero rows in A and B, so the
fused B has the original checkpoint's full output size.

- ``kohya``: ``lora_unet_<original module, dots as underscores>.lora_down.weight`` / ``.lora_up.weight``
  and ``.alpha`` (= the fused rank, so the scale is 1: B carries it).
- ``comfy``: ``diffusion_model.<original module>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
  the keys ComfyUI maps onto its model (``diffusion_model.`` + the checkpoint's weight name).

The mapping below is the one declaration of these layouts (``ORIGINAL``); conversion back
(``to_diffusers``) reads the same table.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

from blockskip.runtime.errors import BlockSkipError

FORMATS = ("diffusers", "kohya", "comfy")
FAMILIES = ("flux", "sd3", "sana")
#: file name of each layout in the output folder
FILE_NAMES = {
    "diffusers": "lora.safetensors",
    "kohya": "lora_kohya.safetensors",
    "comfy": "lora_comfy.safetensors",
}
PREFIX = {"diffusers": "transformer.", "kohya": "lora_unet_", "comfy": "diffusion_model."}


@dataclass(frozen=True)
class Part:
    """One diffusers Linear inside a fused original Linear; ``width`` is its output size in units of
    the fused Linear's q (FLUX's single-block MLP input is 4 units: its mlp_ratio)."""

    module: str
    width: int = 1


def _p(*names: str) -> tuple[Part, ...]:
    return tuple(Part(n) for n in names)


# family -> [(diffusers block prefix, original block prefix, {original module: parts in fused order})]
ORIGINAL: dict[str, list[tuple[str, str, dict[str, tuple[Part, ...]]]]] = {
    "flux": [
        (
            "transformer_blocks",
            "double_blocks",
            {
                "img_attn.qkv": _p("attn.to_q", "attn.to_k", "attn.to_v"),
                "img_attn.proj": _p("attn.to_out.0"),
                "txt_attn.qkv": _p("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                "txt_attn.proj": _p("attn.to_add_out"),
                "img_mlp.0": _p("ff.net.0.proj"),
                "img_mlp.2": _p("ff.net.2"),
                "txt_mlp.0": _p("ff_context.net.0.proj"),
                "txt_mlp.2": _p("ff_context.net.2"),
            },
        ),
        (
            "single_transformer_blocks",
            "single_blocks",
            {
                "linear1": (*_p("attn.to_q", "attn.to_k", "attn.to_v"), Part("proj_mlp", 4)),
                "linear2": _p("proj_out"),
            },
        ),
    ],
    "sd3": [  # SD3 and SD3.5 (attn2: SD3.5's dual attention)
        (
            "transformer_blocks",
            "joint_blocks",
            {
                "x_block.attn.qkv": _p("attn.to_q", "attn.to_k", "attn.to_v"),
                "x_block.attn.proj": _p("attn.to_out.0"),
                "context_block.attn.qkv": _p("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
                "context_block.attn.proj": _p("attn.to_add_out"),
                "x_block.mlp.fc1": _p("ff.net.0.proj"),
                "x_block.mlp.fc2": _p("ff.net.2"),
                "context_block.mlp.fc1": _p("ff_context.net.0.proj"),
                "context_block.mlp.fc2": _p("ff_context.net.2"),
                "x_block.attn2.qkv": _p("attn2.to_q", "attn2.to_k", "attn2.to_v"),
                "x_block.attn2.proj": _p("attn2.to_out.0"),
            },
        ),
    ],
    "sana": [
        (
            "transformer_blocks",
            "blocks",
            {
                "attn.qkv": _p("attn1.to_q", "attn1.to_k", "attn1.to_v"),
                "attn.proj": _p("attn1.to_out.0"),
                "cross_attn.q_linear": _p("attn2.to_q"),
                "cross_attn.kv_linear": _p("attn2.to_k", "attn2.to_v"),
                "cross_attn.proj": _p("attn2.to_out.0"),
            },
        ),
    ],
}

_DIFFUSERS_KEY = re.compile(r"^transformer\.(.+)\.lora_([AB])\.weight$")


def _family(family: str) -> list[tuple[str, str, dict[str, tuple[Part, ...]]]]:
    if family not in ORIGINAL:
        raise BlockSkipError(
            f"unknown family {family!r} for a LoRA layout; choose one of {', '.join(FAMILIES)}"
        )
    return ORIGINAL[family]


def _locate(family: str, module: str) -> tuple[str, int]:
    """diffusers module -> (original module, index of its part)."""
    for dblock, oblock, table in _family(family):
        m = re.match(rf"^{re.escape(dblock)}\.(\d+)\.(.+)$", module)
        if not m:
            continue
        for orig, parts in table.items():
            for j, part in enumerate(parts):
                if part.module == m.group(2):
                    return f"{oblock}.{m.group(1)}.{orig}", j
    raise BlockSkipError(f"LoRA module {module!r} has no place in the original {family} checkpoint layout")


def _parts_of(family: str, orig: str) -> tuple[tuple[Part, ...], str]:
    for dblock, oblock, table in _family(family):
        m = re.match(rf"^{re.escape(oblock)}\.(\d+)\.(.+)$", orig)
        if m and m.group(2) in table:
            return table[m.group(2)], f"{dblock}.{m.group(1)}"
    raise BlockSkipError(f"LoRA module {orig!r} is not a module of the original {family} checkpoint")


def _kohya_name(orig: str) -> str:
    return PREFIX["kohya"] + orig.replace(".", "_")


def _from_kohya_name(family: str, name: str) -> str:
    """kohya drops the dots: find the original module whose underscored name this is."""
    for _, oblock, table in _family(family):
        m = re.match(rf"^{re.escape(oblock.replace('.', '_'))}_(\d+)_(.+)$", name)
        if m:
            for orig in table:
                if orig.replace(".", "_") == m.group(2):
                    return f"{oblock}.{m.group(1)}.{orig}"
    raise BlockSkipError(f"kohya LoRA module {name!r} is not a module of the original {family} checkpoint")


def from_diffusers(tensors: dict[str, np.ndarray], family: str, fmt: str) -> dict[str, np.ndarray]:
    """Convert a diffusers-named LoRA (B scaled, alpha = rank) to ``fmt``."""
    if fmt not in FORMATS:
        raise BlockSkipError(f"unknown LoRA format {fmt!r}; choose one of {', '.join(FORMATS)} (or all)")
    if fmt == "diffusers":
        return dict(tensors)
    pairs: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    for key in tensors:
        m = _DIFFUSERS_KEY.match(key)
        if not m:
            raise BlockSkipError(
                f"{key!r} is not a diffusers LoRA key (transformer.<module>.lora_A/B.weight)"
            )
        if m.group(2) == "B":
            continue
        module = m.group(1)
        b_key = f"{PREFIX['diffusers']}{module}.lora_B.weight"
        if b_key not in tensors:
            raise BlockSkipError(f"LoRA {module!r} has lora_A but no lora_B")
        orig, j = _locate(family, module)
        pairs.setdefault(orig, {})[j] = (
            np.asarray(tensors[key], np.float32),
            np.asarray(tensors[b_key], np.float32),
        )
    out: dict[str, np.ndarray] = {}
    for orig in sorted(pairs):
        down, up = _fuse(family, orig, pairs[orig])
        stem = _kohya_name(orig) if fmt == "kohya" else PREFIX["comfy"] + orig
        out[f"{stem}.lora_down.weight"] = down
        out[f"{stem}.lora_up.weight"] = up
        out[f"{stem}.alpha"] = np.array(down.shape[0], dtype=np.float32)
    return out


def _fuse(
    family: str, orig: str, got: dict[int, tuple[np.ndarray, np.ndarray]]
) -> tuple[np.ndarray, np.ndarray]:
    """A stacked, B block-diagonal over every part of the fused Linear (zeros where the LoRA has none)."""
    parts, _ = _parts_of(family, orig)
    (a0, b0), j0 = next(iter(got.values())), next(iter(got))
    rank, fan_in = a0.shape
    if any(a.shape != (rank, fan_in) or b.shape[1] != rank for a, b in got.values()):
        raise BlockSkipError(f"the LoRA parts of {orig} differ in rank or input size; they cannot be fused")
    unit = b0.shape[0] // parts[j0].width
    n = len(parts)
    down = np.zeros((n * rank, fan_in), np.float32)
    up = np.zeros((sum(p.width * unit for p in parts), n * rank), np.float32)
    row = 0
    for j, part in enumerate(parts):
        rows = part.width * unit
        if j in got:
            a, b = got[j]
            if b.shape[0] != rows:
                raise BlockSkipError(f"{orig}: part {part.module} has {b.shape[0]} outputs, expected {rows}")
            down[j * rank : (j + 1) * rank] = a
            up[row : row + rows, j * rank : (j + 1) * rank] = b
        row += rows
    return down, up


def to_diffusers(tensors: dict[str, np.ndarray], family: str, fmt: str) -> dict[str, np.ndarray]:
    """The inverse of ``from_diffusers`` for a LoRA it wrote (block-diagonal B): the parts' LoRAs, the
    scale alpha/rank folded into B, parts that are all zero left out."""
    if fmt == "diffusers":
        return dict(tensors)
    out: dict[str, np.ndarray] = {}
    for key in sorted(tensors):
        if not key.endswith(".lora_down.weight"):
            continue
        stem = key[: -len(".lora_down.weight")]
        if fmt == "kohya":
            orig = _from_kohya_name(family, stem[len(PREFIX["kohya"]) :])
        else:
            orig = stem[len(PREFIX["comfy"]) :]
        down = np.asarray(tensors[key], np.float32)
        up = np.asarray(tensors[f"{stem}.lora_up.weight"], np.float32)
        parts, dblock = _parts_of(family, orig)
        rank = down.shape[0] // len(parts)
        alpha = float(np.asarray(tensors.get(f"{stem}.alpha", down.shape[0])))
        up = up * np.float32(alpha / down.shape[0])
        unit = up.shape[0] // sum(p.width for p in parts)
        row = 0
        for j, part in enumerate(parts):
            rows = part.width * unit
            a = down[j * rank : (j + 1) * rank]
            b = up[row : row + rows, j * rank : (j + 1) * rank]
            row += rows
            if a.any() or b.any():
                name = f"{PREFIX['diffusers']}{dblock}.{part.module}"
                out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a)
                out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b)
    return out


def formats_of(choice: str) -> tuple[str, ...]:
    """``--lora-format`` value -> the layouts to write."""
    if choice == "all":
        return FORMATS
    if choice not in FORMATS:
        raise BlockSkipError(f"unknown LoRA format {choice!r}; choose one of {', '.join(FORMATS)} or all")
    return (choice,)


def convert_file(src: str | os.PathLike[str], dst: str | os.PathLike[str], family: str, fmt: str) -> None:
    """Write ``dst`` in layout ``fmt`` from the diffusers-named LoRA file ``src`` (atomically)."""
    from blockskip.runtime.files import atomic_write
    from blockskip.runtime.tensorfile import read_tensors, write_tensors

    try:
        tensors = read_tensors(src)
    except (OSError, ValueError) as e:
        raise BlockSkipError(f"cannot read the LoRA file {src}: {e}") from e
    out = from_diffusers(tensors, family, fmt)
    meta = {"format": "pt", "blockskip_layout": fmt, "blockskip_family": family}
    atomic_write(dst, lambda tmp: write_tensors(tmp, out, meta))


def write_layouts(lora_path: str | os.PathLike[str], family: str, choice: str) -> dict[str, str]:
    """Beside the diffusers LoRA ``lora_path``, write the other layouts ``--lora-format`` asks for;
    returns {layout: path} (the diffusers file included: it is always written)."""
    from pathlib import Path

    lora_path = Path(lora_path)
    paths = {"diffusers": str(lora_path)}
    for fmt in formats_of(choice):
        if fmt != "diffusers":
            dst = lora_path.with_name(FILE_NAMES[fmt])
            convert_file(lora_path, dst, family, fmt)
            paths[fmt] = str(dst)
    return paths


# ------------------------------------------------------------------------------------------------
# device_train/native/lora_layouts.h: the same declaration as C++ data (the native runner's
# --lora-format). ``python -m blockskip.runtime.lora_layouts --write`` writes it; ``--check`` says
# whether it is up to date.

HEADER = "device_train/native/lora_layouts.h"
MAX_PARTS = 4


def cpp_header() -> str:
    import json

    q = json.dumps
    lines = [
        "// The LoRA layouts' mapping (runtime/lora_layouts.py ORIGINAL) as C++ data. Generated by",
        "// `python -m blockskip.runtime.lora_layouts --write`; do not edit (docs/events.md).",
        "#pragma once",
        "",
        "namespace blockskip {",
        "namespace lora_layouts {",
        "",
        "struct Part {",
        "  const char* module;  // diffusers module inside the block",
        "  int width;            // output size in units of the fused Linear's q",
        "};",
        "",
        "// One fused Linear of the original checkpoint and its diffusers parts, in fused order.",
        "struct Fused {",
        "  const char* family;",
        "  const char* diffusers_block;  // e.g. transformer_blocks",
        "  const char* original_block;   // e.g. double_blocks",
        "  const char* original;         // inside the block",
        "  int num_parts;",
        f"  Part parts[{MAX_PARTS}];",
        "};",
        "",
        f"inline constexpr char kKohyaPrefix[] = {q(PREFIX['kohya'])};",
        f"inline constexpr char kComfyPrefix[] = {q(PREFIX['comfy'])};",
        f"inline constexpr char kKohyaFile[] = {q(FILE_NAMES['kohya'])};",
        f"inline constexpr char kComfyFile[] = {q(FILE_NAMES['comfy'])};",
        "",
        "inline constexpr Fused kFused[] = {",
    ]
    for family, blocks in ORIGINAL.items():
        for dblock, oblock, table in blocks:
            for orig, parts in table.items():
                assert len(parts) <= MAX_PARTS
                ps = ", ".join(f"{{{q(p.module)}, {p.width}}}" for p in parts)
                lines.append(
                    f"    {{{q(family)}, {q(dblock)}, {q(oblock)}, {q(orig)}, {len(parts)}, {{{ps}}}}},"
                )
    lines += ["};", "", "}  // namespace lora_layouts", "}  // namespace blockskip", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys
    from pathlib import Path

    ap = argparse.ArgumentParser(
        prog="python -m blockskip.runtime.lora_layouts",
        description=f"Write (or check) {HEADER}, the layouts' mapping for the native runner.",
    )
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", action="store_true")
    g.add_argument("--check", action="store_true")
    ap.add_argument("--header", default=HEADER)
    a = ap.parse_args(argv)
    p, text = Path(a.header), cpp_header()
    if a.check:
        if not p.is_file() or p.read_text() != text:
            print(f"out of date: {p}", file=sys.stderr)
            return 1
        return 0
    if not p.is_file() or p.read_text() != text:
        p.write_text(text)
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
