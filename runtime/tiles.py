"""Tiled photo encoding for the program backends (numpy only).

A photo is encoded in overlapping square tiles, each by an encoder program of that tile's shape, and
the latent tiles are blended linearly across their overlap: the same grid, order and in-place blending
as diffusers' tiled encode of ``AutoencoderDC`` and ``AutoencoderKL`` (its moments' means, blended, are
the blended latents: the blend weights sum to one), which the torch backend runs, so both write the same
cache. The encoder's activations are then those of one tile, not of the photo. The two encoders differ
in the stride between tiles (``STRIDES``); the manifest's ``tiles`` record says which one a bundle uses.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import numpy.typing as npt

F32 = npt.NDArray[np.float32]
Array = npt.NDArray[Any]  # any dtype: converted to float32 where read

TILE = 256  # px (the torch backend's ``latent.TILE``)
STRIDE = TILE * 7 // 8  # px between tile starts of a DC-AE encoder: 32 px overlap
# px between tile starts per encoder class: diffusers' defaults (AutoencoderKL: tile_overlap_factor 0.25)
STRIDES = {"AutoencoderDC": STRIDE, "AutoencoderKL": TILE * 3 // 4}


def stride_for(encoder_class: str) -> int:
    """The tile stride of an encoder class that encodes in tiles (KeyError for others)."""
    return STRIDES[encoder_class]


def tile_spans(size: int, ratio: int, tile: int = TILE, stride: int = STRIDE) -> list[tuple[int, int]]:
    """(start, padded length) of the tiles along one side of ``size`` px."""
    out = []
    for s in range(0, size, stride):
        n = min(tile, size - s)
        out.append((s, n + (ratio - n) % ratio))
    return out


def tile_shapes(size: int, ratio: int, stride: int = STRIDE) -> list[tuple[int, int]]:
    """The distinct (height, width) of the tiles of a ``size`` x ``size`` photo: one program each."""
    lens = sorted({n for _, n in tile_spans(size, ratio, stride=stride)}, reverse=True)
    return [(h, w) for h in lens for w in lens]


def _tile(image: Array, i: int, j: int, ratio: int, tile: int = TILE) -> F32:
    t = image[:, :, i : i + tile, j : j + tile]
    ph, pw = (ratio - t.shape[2]) % ratio, (ratio - t.shape[3]) % ratio
    if ph or pw:
        t = np.pad(t, ((0, 0), (0, 0), (0, ph), (0, pw)))
    return np.ascontiguousarray(t, dtype=np.float32)


def blend_tiles(
    rows: list[list[F32]], height: int, width: int, ratio: int, tile: int = TILE, stride: int = STRIDE
) -> F32:
    """Latent tiles (row-major, as ``tile_spans`` lays them out) -> the photo's latent."""
    lat_tile, lat_stride = tile // ratio, stride // ratio
    blend = lat_tile - lat_stride
    out_rows = []
    for r, row in enumerate(rows):
        parts = []
        for c, t in enumerate(row):
            if r > 0:  # blend the tile above into this one (in place: later tiles see the blended values)
                a = rows[r - 1][c]
                e = min(a.shape[2], t.shape[2], blend)
                for y in range(e):
                    t[:, :, y, :] = a[:, :, -e + y, :] * (1 - y / e) + t[:, :, y, :] * (y / e)
            if c > 0:  # and the tile to the left
                a = row[c - 1]
                e = min(a.shape[3], t.shape[3], blend)
                for x in range(e):
                    t[:, :, :, x] = a[:, :, :, -e + x] * (1 - x / e) + t[:, :, :, x] * (x / e)
            parts.append(t[:, :, :lat_stride, :lat_stride])
        out_rows.append(np.concatenate(parts, axis=3))
    return np.concatenate(out_rows, axis=2)[:, :, : height // ratio, : width // ratio]


def encode_tiled(
    image: Array,
    encode: Callable[[F32], Array],
    ratio: int,
    tile: int = TILE,
    stride: int = STRIDE,
) -> F32:
    """[1,3,H,W] -> [1,C,H/ratio,W/ratio]; ``encode`` maps one tile [1,3,h,w] to its latent."""
    _, _, height, width = image.shape
    rows = [
        [
            np.array(encode(_tile(image, i, j, ratio, tile)), dtype=np.float32)
            for j, _ in tile_spans(width, ratio, tile, stride)
        ]
        for i, _ in tile_spans(height, ratio, tile, stride)
    ]
    return blend_tiles(rows, height, width, ratio, tile, stride)


def encode_photos(
    sec: dict[str, Any],
    images: Array,
    load: Callable[[str], object],
    run: Callable[[object, F32], Array],
) -> F32:
    """Photos [N,3,S,S] -> latents with a format's encoder programs (the manifest record ``sec``):
    ``load(relative file)`` opens a program, ``run(program, [1,3,h,w])`` runs it. In tiles when ``sec``
    says so: one tile shape at a time over every photo, so one program (its weights and its one-tile
    activations) is loaded at a time; else one program for the whole photo."""
    from blockskip.runtime.errors import BlockSkipError

    want = list(sec["input"][1:])
    programs = sec.get("programs") or {f"{want[1]}x{want[2]}": {"file": sec["file"]}}
    for im in images:
        if list(im.shape) != want:
            raise BlockSkipError(
                f"photo tensor {list(im.shape)} does not match the exported encoder input {want}"
            )

    def program(key: str) -> object:
        if key not in programs:
            raise BlockSkipError(f"the bundle has no encoder program for {key} px inputs; export it again")
        return load(programs[key]["file"])

    tiles = sec.get("tiles")
    if not tiles:
        prog = program(f"{want[1]}x{want[2]}")
        out = [
            np.asarray(run(prog, np.ascontiguousarray(im[None], dtype=np.float32)), dtype=np.float32)
            for im in images
        ]
        del prog
        return np.concatenate(out)
    tile, stride, ratio, (_, height, width) = (
        int(tiles["tile"]),
        int(tiles["stride"]),
        int(tiles["ratio"]),
        want,
    )
    grid = [
        (r, c, i, j, f"{hi}x{wj}")
        for r, (i, hi) in enumerate(tile_spans(height, ratio, tile, stride))
        for c, (j, wj) in enumerate(tile_spans(width, ratio, tile, stride))
    ]
    lat: dict[tuple[int, int, int], F32] = {}
    for key in dict.fromkeys(k for *_, k in grid):
        prog = program(key)
        for n, im in enumerate(images):
            for r, c, i, j, k in grid:
                if k == key:
                    lat[n, r, c] = np.array(run(prog, _tile(im[None], i, j, ratio, tile)), dtype=np.float32)
        del prog
    n_rows, n_cols = grid[-1][0] + 1, grid[-1][1] + 1
    return np.concatenate(
        [
            blend_tiles(
                [[lat[n, r, c] for c in range(n_cols)] for r in range(n_rows)],
                height,
                width,
                ratio,
                tile,
                stride,
            )
            for n in range(len(images))
        ]
    )
