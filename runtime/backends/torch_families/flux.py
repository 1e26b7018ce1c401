"""FLUX (FluxTransformer2DModel): 19 double-stream + 38 single-stream blocks at full size.

Boundary state (hidden, encoder); constants temb and RoPE (cos, sin) from float ids, so a resized
crop gets fractional positions of where it sits in the s_max frame.
"""

from __future__ import annotations

import torch

from blockskip.runtime.backends.torch_families.base import (
    CropGeometry,
    DiffusersModel,
    State,
    TorchFamily,
    crop_coords,
    pixel_shuffle_tokens,
    pixel_unshuffle_tokens,
)

DOUBLE_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
# Text queries and the text output path only change the text stream.
DOUBLE_TEXT_ONLY = ["attn.add_q_proj", "attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2"]
SINGLE_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"]


class FluxFamily(TorchFamily):
    name = "flux"
    class_name = "FluxTransformer2DModel"
    state_keys = ("hidden", "encoder")
    embed_prefixes = ["x_embedder", "time_text_embed", "context_embedder", "pos_embed"]
    head_prefixes = ["norm_out", "proj_out"]

    @property
    def patch_size(self) -> int:
        return 2  # 2x2 latent packing

    @property
    def num_double(self) -> int:
        return int(self.config.get("num_layers", 19))

    def block_paths(self) -> list[str]:
        n_single = int(self.config.get("num_single_layers", 38))
        return [f"transformer_blocks.{i}" for i in range(self.num_double)] + [
            f"single_transformer_blocks.{i}" for i in range(n_single)
        ]

    def block_kind(self, i: int) -> str:
        return "double" if i < self.num_double else "single"

    def lora_targets(self, i: int) -> list[str]:
        return list(DOUBLE_TARGETS if self.block_kind(i) == "double" else SINGLE_TARGETS)

    def text_output_only(self, i: int) -> list[str]:
        return list(DOUBLE_TEXT_ONLY) if self.block_kind(i) == "double" else []

    def prepare_text(self, model: DiffusersModel, text: State) -> State:
        return {"encoder": model.context_embedder(text["prompt_embeds"]), "pooled": text["pooled"]}

    def embed(
        self,
        model: DiffusersModel,
        latent: torch.Tensor,
        sigma: torch.Tensor,
        text: State,
        geom: CropGeometry,
        positions: str = "crop",
        guidance: float = 3.5,
    ) -> tuple[State, State]:
        dtype = latent.dtype
        tokens = self.to_tokens(latent)
        hidden = model.x_embedder(tokens)
        timestep = sigma.to(dtype) * 1000
        if self.config.get("guidance_embeds", False):
            gscale = torch.full_like(timestep, guidance) * 1000
            temb = model.time_text_embed(timestep, gscale, text["pooled"])
        else:
            temb = model.time_text_embed(timestep, text["pooled"])
        rows, cols = crop_coords(geom, 2, positions)
        g = len(rows)
        img_ids = torch.zeros(g, g, 3, dtype=torch.float64)
        img_ids[..., 1] = rows[:, None]
        img_ids[..., 2] = cols[None, :]
        txt_ids = torch.zeros(text["encoder"].shape[1], 3, dtype=torch.float64)
        ids = torch.cat([txt_ids, img_ids.reshape(g * g, 3)], dim=0).to(latent.device)
        cos, sin = model.pos_embed(ids)
        state = {"hidden": hidden, "encoder": text["encoder"]}
        return state, {"temb": temb, "rope_cos": cos, "rope_sin": sin}

    def call_block(self, block: DiffusersModel, state: State, consts: State) -> State:
        enc, hid = block(
            hidden_states=state["hidden"],
            encoder_hidden_states=state["encoder"],
            temb=consts["temb"],
            image_rotary_emb=(consts["rope_cos"], consts["rope_sin"]),
        )
        return {"hidden": hid, "encoder": enc}

    def head(self, model: DiffusersModel, state: State, consts: State) -> torch.Tensor:
        out: torch.Tensor = model.proj_out(model.norm_out(state["hidden"], consts["temb"]))
        return out

    def to_tokens(self, latent: torch.Tensor) -> torch.Tensor:
        return pixel_unshuffle_tokens(latent, 2, channels_last=False)

    def from_tokens(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return pixel_shuffle_tokens(tokens, h, w, 2, channels_last=False)
