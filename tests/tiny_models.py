"""Tiny in-process models of each family (a few thousand to tens of thousands of parameters)."""

from __future__ import annotations

import torch

TINY_CONFIGS = {
    "flux": dict(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=12,
        guidance_embeds=False,
        axes_dims_rope=(2, 2, 4),
    ),
    "flux-guidance": dict(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        pooled_projection_dim=12,
        guidance_embeds=True,
        axes_dims_rope=(2, 2, 4),
    ),
    "sd3": dict(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        out_channels=4,
        pos_embed_max_size=24,
    ),
    "sd35": dict(
        sample_size=16,
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=24,
        caption_projection_dim=16,
        pooled_projection_dim=12,
        out_channels=4,
        pos_embed_max_size=24,
        dual_attention_layers=(0, 1),
        qk_norm="rms_norm",
    ),
    "sana": dict(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=4,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=24,
        mlp_ratio=2.5,
        sample_size=16,
        patch_size=1,
        norm_elementwise_affine=False,
        interpolation_scale=None,
    ),
}
FAMILY = {"flux": "flux", "flux-guidance": "flux", "sd3": "sd3", "sd35": "sd3", "sana": "sana"}


def build(name: str, seed: int = 0):
    import diffusers

    cls = {
        "flux": diffusers.FluxTransformer2DModel,
        "sd3": diffusers.SD3Transformer2DModel,
        "sana": diffusers.SanaTransformer2DModel,
    }[FAMILY[name]]
    torch.manual_seed(seed)
    model = cls(**TINY_CONFIGS[name]).eval()
    # random (not default-zero) adaLN/out weights so every path carries signal
    with torch.no_grad():
        for p in model.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.02)
    return model


def tiny_vae(kind: str, latent_channels: int, encoder_channels=None, downsample: str = "Conv"):
    """A tiny VAE of the class each family ships with (FLUX and SD3: AutoencoderKL; SANA: DC-AE; its
    encoder's widths may be given, one per level (KL: also the decoder's; 32 GroupNorm groups where the
    widths allow, as the real ones), and DC-AE's downsampling)."""
    from diffusers import AutoencoderDC, AutoencoderKL

    torch.manual_seed(0)
    if kind == "AutoencoderKL":
        widths = tuple(encoder_channels or (8, 16))
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * len(widths),
            up_block_types=("UpDecoderBlock2D",) * len(widths),
            block_out_channels=widths,
            latent_channels=latent_channels,
            norm_num_groups=32 if min(widths) % 32 == 0 else 4,
            layers_per_block=1,
            scaling_factor=0.5,
            shift_factor=0.1,
        )
    encoder_channels = encoder_channels or (8, 16, 16)
    return AutoencoderDC(
        in_channels=3,
        latent_channels=latent_channels,
        attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=encoder_channels,
        decoder_block_out_channels=(8, 16, 16),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type=downsample,
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41,
    )


# tiny transformer -> (VAE class, latent channels, that VAE's downsampling, prompt embedding shapes)
FOLDERS = {
    "flux": ("flux", "AutoencoderKL", 4, 2, {"prompt_embeds": (1, 5, 24), "pooled": (1, 12)}),
    "sd3": ("sd3", "AutoencoderKL", 4, 2, {"prompt_embeds": (1, 5, 24), "pooled": (1, 12)}),
    "sd35": ("sd35", "AutoencoderKL", 4, 2, {"prompt_embeds": (1, 5, 24), "pooled": (1, 12)}),
    "sana": ("sana", "AutoencoderDC", 4, 4, {"prompt_embeds": (1, 5, 24)}),
}


def write_folder(root, name: str, max_shard_size: str | None = None, dtype=torch.float32):
    """A diffusers model folder (transformer/, vae/, prompt_embeds.safetensors) of a tiny model, its
    transformer saved in ``dtype``; ``max_shard_size`` splits the transformer into shards with an index, as
    large models are saved."""
    from safetensors.torch import save_file

    tiny, vae_cls, channels, _, prompt = FOLDERS[name]
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    build(tiny).to(dtype).save_pretrained(root / "transformer", **kw)
    tiny_vae(vae_cls, channels).save_pretrained(root / "vae")
    g = torch.Generator().manual_seed(1)
    save_file(
        {k: torch.randn(*v, generator=g) for k, v in prompt.items()}, root / "prompt_embeds.safetensors"
    )
    return root
