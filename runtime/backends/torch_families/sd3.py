"""SD3 / SD3.5 (SD3Transformer2DModel): joint blocks, SD3.5 dual attention and qk-norm included.

Boundary state (hidden, encoder); the last block is context_pre_only and returns no text. Positions
come from a sincos table that diffusers centre-crops; for a resized crop we sample the s_max table
bilinearly at the crop's token centres.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from blockskip.runtime.backends.torch_families.base import (
    CropGeometry,
    DiffusersModel,
    State,
    TorchFamily,
    crop_coords,
    pixel_shuffle_tokens,
    pixel_unshuffle_tokens,
)
from blockskip.runtime.errors import PlanError

IMAGE_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = [
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]
TEXT_ONLY = ["attn.add_q_proj", "attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2"]
DUAL_TARGETS = ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]


class SD3Family(TorchFamily):
    name = "sd3"
    class_name = "SD3Transformer2DModel"
    state_keys = ("hidden", "encoder")
    embed_prefixes = ["pos_embed", "time_text_embed", "context_embedder"]
    head_prefixes = ["norm_out", "proj_out"]

    def block_paths(self) -> list[str]:
        return [f"transformer_blocks.{i}" for i in range(int(self.config.get("num_layers", 18)))]

    def block_kind(self, i: int) -> str:
        dual = i in tuple(self.config.get("dual_attention_layers", ()) or ())
        last = i == self.num_blocks - 1
        return "joint" + ("-dual" if dual else "") + ("-last" if last else "")

    def lora_targets(self, i: int) -> list[str]:
        kind = self.block_kind(i)
        out = list(IMAGE_TARGETS)
        if kind.endswith("-last"):  # context_pre_only: text keys/values feed the image, nothing else
            out += ["attn.add_k_proj", "attn.add_v_proj"]
        else:
            out += TEXT_TARGETS
        if "-dual" in kind:
            out += DUAL_TARGETS
        return out

    def text_output_only(self, i: int) -> list[str]:
        return list(TEXT_ONLY)

    def prepare_text(self, model: DiffusersModel, text: State) -> State:
        return {"encoder": model.context_embedder(text["prompt_embeds"]), "pooled": text["pooled"]}

    def _positions(self, model: DiffusersModel, geom: CropGeometry, dtype: torch.dtype) -> torch.Tensor:
        pe = model.pos_embed
        p = self.patch_size
        M = pe.pos_embed_max_size
        full = geom.full // p
        if full > M:
            raise PlanError(f"s_max is {full} tokens per side but this SD3 model's position table has {M}")
        table = pe.pos_embed.reshape(1, M, M, -1).permute(0, 3, 1, 2).float()  # [1,D,M,M]
        rows, cols = crop_coords(geom, p, "crop")
        off = (M - full) // 2  # diffusers centre-crops the table for the s_max grid
        ry, rx = (rows + off) / (M - 1) * 2 - 1, (cols + off) / (M - 1) * 2 - 1
        grid = torch.stack(torch.meshgrid(rx, ry, indexing="xy"), dim=-1)[None].float()  # [1,g,g,2] (x,y)
        out = F.grid_sample(table, grid, mode="bilinear", align_corners=True)  # [1,D,g,g]
        return out.flatten(2).transpose(1, 2).to(dtype)

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
        if positions == "native":
            hidden = model.pos_embed(latent)
        else:
            pe = model.pos_embed
            x = pe.proj(latent).flatten(2).transpose(1, 2)
            if pe.layer_norm:
                x = pe.norm(x)
            hidden = (x + self._positions(model, geom, x.dtype)).to(x.dtype)
        hidden = hidden.contiguous()
        temb = model.time_text_embed(sigma.to(latent.dtype) * 1000, text["pooled"])
        return {"hidden": hidden, "encoder": text["encoder"]}, {"temb": temb}

    def call_block(self, block: DiffusersModel, state: State, consts: State) -> State:
        enc, hid = block(
            hidden_states=state["hidden"], encoder_hidden_states=state["encoder"], temb=consts["temb"]
        )
        return {"hidden": hid, "encoder": enc}

    def head(self, model: DiffusersModel, state: State, consts: State) -> torch.Tensor:
        out: torch.Tensor = model.proj_out(model.norm_out(state["hidden"], consts["temb"]))
        return out

    def to_tokens(self, latent: torch.Tensor) -> torch.Tensor:
        return pixel_unshuffle_tokens(latent, self.patch_size, channels_last=True)

    def from_tokens(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        return pixel_shuffle_tokens(tokens, h, w, self.patch_size, channels_last=True)
