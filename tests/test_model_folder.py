"""A real diffusers folder (transformer/ + vae/ saved with save_pretrained) exports and trains offline."""

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import FOLDERS, build, write_folder

from blockskip.device_train.app import run_precompute, run_train
from blockskip.export.bundle_writer import export_bundle
from blockskip.export.families import load_model
from blockskip.runtime.bundle import Bundle
from blockskip.runtime.plan import Plan
from blockskip.runtime.profiles import load_profile


def test_flux_folder_with_autoencoder_kl(tmp_path, photos):
    from diffusers import AutoencoderKL

    root = tmp_path / "tiny-flux"
    build("flux").save_pretrained(root / "transformer")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        scaling_factor=0.5,
        shift_factor=0.1,
    )
    vae.save_pretrained(root / "vae")
    save_file(
        {"prompt_embeds": torch.randn(1, 5, 24), "pooled": torch.randn(1, 12)},
        root / "prompt_embeds.safetensors",
    )
    lm = load_model(str(root))
    assert lm.family.name == "flux" and lm.vae_factor == 2 and lm.granularity == 4
    plan = Plan(front_skip=1, back_skip=1, s_min=16, s_max=32, num_samples=3, steps=2)
    export_bundle(lm, plan, load_profile("desktop-cpu"), "a photo of sks", tmp_path / "b")
    assert Bundle(tmp_path / "b").manifest["encoder"]["class"] == "AutoencoderKL"
    run_precompute(tmp_path / "b", photos, tmp_path / "c", quiet=True)
    log = run_train(tmp_path / "b", tmp_path / "c", tmp_path / "o", quiet=True)
    assert len(log["losses"]) == 2 and all(x == x for x in log["losses"])

    # the device-side encoder (materialised from the bundle) equals the diffusers VAE's scaled latent
    from blockskip.runtime.backends.torch_families.latent import encode_images
    from blockskip.runtime.backends.torch_io import load_encoder

    enc, spec = load_encoder(Bundle(tmp_path / "b"))
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        ref = (vae.encode(x).latent_dist.mode() - 0.1) * 0.5
        torch.testing.assert_close(encode_images(enc, spec, x), ref)


def test_tiled_vae_encoding_bounds_precompute_memory():
    """Tiled encoding (diffusers' own) keeps the encoder's activations to about one tile."""
    from diffusers import AutoencoderKL

    from blockskip.export.memory.tracer import MemoryTracer
    from blockskip.runtime.backends.torch_families.latent import enable_tiling, encode_images

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=4,
        layers_per_block=1,
        sample_size=512,
    ).eval()
    spec = {"class": "AutoencoderKL", "scaling_factor": 1.0, "shift_factor": None}
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    peaks, outs = {}, {}
    for tiled in (False, True):
        if tiled:
            enable_tiling(vae, spec)
        tr = MemoryTracer()
        with torch.no_grad(), tr:
            outs[tiled] = encode_images(vae, spec, x)
        peaks[tiled] = tr.peak
    assert outs[True].shape == outs[False].shape
    assert peaks[True] < 0.6 * peaks[False]
    assert (outs[True] - outs[False]).abs().mean() < 0.1 * outs[False].abs().mean()


@pytest.mark.parametrize("name", ["sd3", "sd35", "sana"])
def test_every_family_folder_with_its_vae_class(tmp_path, photos, name):
    """SD3 / SD3.5 folders with AutoencoderKL and SANA with AutoencoderDC (whose config has
    ``encoder_block_out_channels``, no ``block_out_channels``): the export and the dry run read the same
    encoder spec and downsampling, and the folder exports, precomputes and trains."""
    from blockskip.export.memory.specs import load_spec

    _, vae_cls, _, factor, _ = FOLDERS[name]
    root = write_folder(tmp_path / name, name)
    lm = load_model(str(root))
    spec, _ = load_spec(str(root))
    assert lm.vae_factor == spec.vae_factor == factor
    assert lm.encoder_spec == spec.encoder_spec and lm.encoder_spec["class"] == vae_cls
    plan = Plan(front_skip=1, back_skip=1, s_min=16, s_max=32, num_samples=2, steps=2)
    export_bundle(lm, plan, load_profile("desktop-cpu"), "a photo of sks", tmp_path / "b")
    assert Bundle(tmp_path / "b").manifest["encoder"]["class"] == vae_cls
    run_precompute(tmp_path / "b", photos, tmp_path / "c", quiet=True)
    log = run_train(tmp_path / "b", tmp_path / "c", tmp_path / "o", quiet=True)
    assert len(log["losses"]) == 2 and all(x == x for x in log["losses"])


def test_a_vae_config_without_its_channels_is_refused():
    from blockskip.export.families.base import vae_spec
    from blockskip.runtime.errors import ModelError

    with pytest.raises(ModelError, match="encoder_block_out_channels"):
        vae_spec("AutoencoderDC", {"block_out_channels": [8, 16]})
    with pytest.raises(ModelError, match="unsupported VAE class 'AutoencoderTiny'"):
        vae_spec("AutoencoderTiny", {})
