"""Tiny in-process models of each family (a few thousand to tens of thousands of parameters)."""

from __future__ import annotations

import torch

TINY_CONFIGS = {
    "flux": dict(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12,
                 guidance_embeds=False, axes_dims_rope=(2, 2, 4)),
    "flux-guidance": dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8,
                          num_attention_heads=2, joint_attention_dim=24, pooled_projection_dim=12,
                          guidance_embeds=True, axes_dims_rope=(2, 2, 4)),
    "sd3": dict(sample_size=16, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16,
                pooled_projection_dim=12, out_channels=4, pos_embed_max_size=24),
    "sd35": dict(sample_size=16, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                 num_attention_heads=2, joint_attention_dim=24, caption_projection_dim=16,
                 pooled_projection_dim=12, out_channels=4, pos_embed_max_size=24,
                 dual_attention_layers=(0, 1), qk_norm="rms_norm"),
    "sana": dict(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=4,
                 num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16,
                 caption_channels=24, mlp_ratio=2.5, sample_size=16, patch_size=1, norm_elementwise_affine=False,
                 interpolation_scale=None),
}
FAMILY = {"flux": "flux", "flux-guidance": "flux", "sd3": "sd3", "sd35": "sd3", "sana": "sana"}


def build(name: str, seed: int = 0):
    import diffusers

    cls = {"flux": diffusers.FluxTransformer2DModel, "sd3": diffusers.SD3Transformer2DModel,
           "sana": diffusers.SanaTransformer2DModel}[FAMILY[name]]
    torch.manual_seed(seed)
    model = cls(**TINY_CONFIGS[name]).eval()
    # random (not default-zero) adaLN/out weights so every path carries signal
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model
