"""SANA (SanaTransformer2DModel): linear-attention blocks with a 3x3 depthwise conv (GLUMBConv).

Boundary state is hidden only; constants are the adaLN timestep, the embedded timestep, the caption
tokens and the token grid (h, w) the conv needs. SANA-1.6B has no positional embedding
(interpolation_scale None), so crops need no position handling.
"""

from __future__ import annotations

import math

import torch

from blockskip.runtime.backends.torch_families.base import (
    CropGeometry,
    DiffusersModel,
    State,
    TorchFamily,
    pixel_shuffle_tokens,
    pixel_unshuffle_tokens,
)

TARGETS = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
]


class SanaFamily(TorchFamily):
    name = "sana"
    class_name = "SanaTransformer2DModel"
    state_keys = ("hidden",)
    embed_prefixes = ["patch_embed", "time_embed", "caption_projection", "caption_norm"]
    head_prefixes = ["norm_out", "proj_out", "scale_shift_table"]

    def block_paths(self) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(int(self.config.get("num_layers", 20)))]

    def block_kind(self, i: int) -> str:
        return "sana"

    def lora_targets(self, i: int) -> list[str]:
        return list(TARGETS)

    def prepare_text(self, model: DiffusersModel, text: State) -> State:
        e = model.caption_projection(text["prompt_embeds"])
        e = e.view(e.shape[0], -1, model.config.num_attention_heads * model.config.attention_head_dim)
        return {"encoder": model.caption_norm(e)}

    def embed(
        self,
        model: DiffusersModel,
        latent: torch.Tensor,
        sigma: torch.Tensor,
        text: State,
        geom: CropGeometry,
        positions: str = "crop",
        guidance: float = 0.0,
    ) -> tuple[State, State]:
        hidden = model.patch_embed(latent)
        timestep = sigma.to(latent.dtype) * 1000
        if self.config.get("guidance_embeds", False):
            t6, emb_t = model.time_embed(
                timestep, guidance=timestep.new_full(timestep.shape, guidance), hidden_dtype=hidden.dtype
            )
        else:
            t6, emb_t = model.time_embed(timestep, batch_size=latent.shape[0], hidden_dtype=hidden.dtype)
        return {"hidden": hidden}, {"timestep": t6, "embedded_timestep": emb_t, "encoder": text["encoder"]}

    def call_block(self, block: DiffusersModel, state: State, consts: State) -> State:
        g = math.isqrt(state["hidden"].shape[1])
        hid = block(state["hidden"], None, consts["encoder"], None, consts["timestep"], g, g)
        return {"hidden": hid}

    def head(self, model: DiffusersModel, state: State, consts: State) -> torch.Tensor:
        h = model.norm_out(state["hidden"], consts["embedded_timestep"], model.scale_shift_table)
        out: torch.Tensor = model.proj_out(h)
        return out

    def to_tokens(self, latent: torch.Tensor) -> torch.Tensor:
        return pixel_unshuffle_tokens(latent, self.patch_size, channels_last=True)

    def from_tokens(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return pixel_shuffle_tokens(tokens, h, w, self.patch_size, channels_last=True)
