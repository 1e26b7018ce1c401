"""Family interface and the skeleton helpers (materialise / release tensors by full name)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

State = dict[str, torch.Tensor]
# A diffusers model (transformer or VAE): diffusers carries no type information, so the submodules and
# methods a family reaches by attribute (``model.x_embedder``, ``vae.encode``) are untyped.
DiffusersModel = Any


@dataclass(frozen=True)
class CropGeometry:
    """Where a training crop came from, in latent pixels of the s_max latent."""

    full: int  # latent side of the whole s_max photo
    side: int  # latent side of the crop
    top: int
    left: int
    low: int  # latent side after resizing (s_min)


def _owner(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    mod_path, _, leaf = name.rpartition(".")
    return (root.get_submodule(mod_path) if mod_path else root), leaf


def materialize(root: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put real tensors into a meta skeleton, by full parameter/buffer name (frozen)."""
    for name, t in tensors.items():
        mod, leaf = _owner(root, name)
        if leaf in mod._parameters:
            mod._parameters[leaf] = nn.Parameter(t, requires_grad=False)
        elif leaf in mod._buffers:
            mod._buffers[leaf] = t
        else:
            raise KeyError(f"{name} is neither a parameter nor a buffer of the model")


def release(root: nn.Module, names: Iterable[str]) -> None:
    """Swap the named tensors back to meta so their memory is freed."""
    for name in names:
        mod, leaf = _owner(root, name)
        if leaf in mod._parameters:
            p = mod._parameters[leaf]
            assert p is not None
            mod._parameters[leaf] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
        else:
            b = mod._buffers[leaf]
            assert b is not None
            mod._buffers[leaf] = torch.empty_like(b, device="meta")


def tensor_names(root: nn.Module, prefixes: list[str]) -> list[str]:
    """All parameter and buffer names (non-persistent buffers included) under the given prefixes."""
    out = []
    for name, _ in list(root.named_parameters()) + list(root.named_buffers()):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            out.append(name)
    return out


class TorchFamily:
    """One model family. Subclasses fill in the class attributes and the five run methods."""

    name: str = ""
    class_name: str = ""
    state_keys: tuple[str, ...] = ("hidden",)
    embed_prefixes: list[str] = []
    head_prefixes: list[str] = []

    def __init__(self, config: dict[str, Any]):
        self.config = {k: v for k, v in config.items() if not k.startswith("_")}

    # --- structure -------------------------------------------------------------------------
    def model_class(self) -> DiffusersModel:
        import diffusers

        return getattr(diffusers, self.class_name)

    def skeleton(self) -> nn.Module:
        """The full model on the meta device: structure and names, no memory."""
        with torch.device("meta"):
            model: nn.Module = self.model_class().from_config(self.config)
        return model.eval().requires_grad_(False)

    def block_paths(self) -> list[str]:
        raise NotImplementedError

    @property
    def num_blocks(self) -> int:
        return len(self.block_paths())

    def block_kind(self, i: int) -> str:
        raise NotImplementedError

    @property
    def patch_size(self) -> int:
        return int(self.config.get("patch_size", 1))

    # --- LoRA ------------------------------------------------------------------------------
    def lora_targets(self, i: int) -> list[str]:
        """Default LoRA targets (module names inside block i): attention and MLP linears, no adaLN."""
        raise NotImplementedError

    def text_output_only(self, i: int) -> list[str]:
        """Targets of block i that only feed its text output (dead if no trained block follows)."""
        return []

    def valid_targets(self) -> set[str]:
        return {t for i in range(self.num_blocks) for t in self.lora_targets(i)}

    # --- running ---------------------------------------------------------------------------
    def embed(
        self,
        model: DiffusersModel,
        latent: torch.Tensor,
        sigma: torch.Tensor,
        text: State,
        geom: CropGeometry,
        positions: str,
        guidance: float,
    ) -> tuple[State, State]:
        """Noisy low-res latent [1,C,h,w] -> (state, consts) entering block 0."""
        raise NotImplementedError

    def run_block(self, model: nn.Module, i: int, state: State, consts: State) -> State:
        return self.call_block(model.get_submodule(self.block_paths()[i]), state, consts)

    def call_block(self, block: nn.Module, state: State, consts: State) -> State:
        """Run one block module (the model's own, or a streamed stand-in with the same structure)."""
        raise NotImplementedError

    def head(self, model: DiffusersModel, state: State, consts: State) -> torch.Tensor:
        raise NotImplementedError

    def to_tokens(self, latent: torch.Tensor) -> torch.Tensor:
        """Latent [B,C,H,W] -> the head's output layout [B,N,D] (for the flow-matching target)."""
        raise NotImplementedError

    def from_tokens(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        raise NotImplementedError

    def prepare_text(self, model: DiffusersModel, text: State) -> State:
        """Prompt embeddings -> what embed() needs (done once per run)."""
        return text


def pixel_unshuffle_tokens(latent: torch.Tensor, p: int, channels_last: bool) -> torch.Tensor:
    """[B,C,H,W] -> [B,(H/p)(W/p), D]; D ordered (p q c) if channels_last else (c p q)."""
    b, c, h, w = latent.shape
    x = latent.reshape(b, c, h // p, p, w // p, p)
    x = x.permute(0, 2, 4, 3, 5, 1) if channels_last else x.permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def pixel_shuffle_tokens(tokens: torch.Tensor, h: int, w: int, p: int, channels_last: bool) -> torch.Tensor:
    """Inverse of :func:`pixel_unshuffle_tokens`; h, w are latent sizes."""
    b, n, d = tokens.shape
    c = d // (p * p)
    if channels_last:
        x = tokens.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4)
    else:
        x = tokens.reshape(b, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, h, w)


def crop_coords(geom: CropGeometry, p: int, positions: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-centre (rows, cols) of the low-res token grid in s_max token units.

    "crop": where each resized token sits in the whole photo (fractional); "native": 0..g-1.
    """
    g = geom.low // p
    i = torch.arange(g, dtype=torch.float64)
    if positions == "native":
        return i, i
    scale = (geom.side / p) / g
    return geom.top / p + (i + 0.5) * scale - 0.5, geom.left / p + (i + 0.5) * scale - 0.5


def run_span(
    family: TorchFamily, model: nn.Module, start: int, stop: int, state: State, consts: State
) -> State:
    """Run blocks [start, stop) of a family on a (materialised) model."""
    for i in range(start, stop):
        state = family.run_block(model, i, state, consts)
    return state
