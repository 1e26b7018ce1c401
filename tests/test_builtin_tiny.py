"""The built-in pretrained ``tiny`` model: its weights, what it learned, and how the CLIs use it."""

import json

import numpy as np
import pytest
import torch

from blockskip.export import tiny
from blockskip.export.families import load_model
from blockskip.export.sampling import decode, sample_latents, sampling_defaults


@pytest.fixture(scope="module")
def lm():
    return load_model("tiny")


def test_weights_file_records_how_it_was_made():
    meta = tiny.weights_metadata()
    assert tiny.WEIGHTS.stat().st_size <= 20 * 2**20
    cfg = json.loads(meta["config"])
    assert cfg["num_layers"] == tiny.TINY_CONFIG["num_layers"]
    assert cfg["num_single_layers"] == tiny.TINY_CONFIG["num_single_layers"]
    assert "--steps" in meta["reproduce"] and "pretrain_tiny" in meta["reproduce"]
    assert meta["stopped_early"] == "false"
    assert json.loads(meta["latent"])["class"] == "PatchDCTAutoencoder"


def test_loads_as_a_diffusers_flux_model_with_its_mapping(lm):
    from diffusers import FluxTransformer2DModel
    from safetensors.torch import load_file

    assert isinstance(lm.transformer, FluxTransformer2DModel)
    assert lm.family.name == "flux" and lm.family.num_blocks == 9
    assert lm.latent_channels == 16 and lm.vae_factor == 4
    sd = load_file(str(tiny.WEIGHTS))
    for k, v in list(sd.items())[:20]:
        torch.testing.assert_close(lm.transformer.state_dict()[k], v.float())
    text = lm.encode_prompt("a red circle on a blue background")
    assert text["prompt_embeds"].shape == (1, tiny.TEXT["tokens"], 64)
    assert not torch.equal(
        text["prompt_embeds"], lm.encode_prompt("a blue circle on a red background")["prompt_embeds"]
    )


def test_it_learned_its_data(lm):
    """On fresh captioned data the pretrained model's flow-matching loss is far below an untrained one's."""
    from tools.pretrain_tiny import build_model, predict
    from tools.tiny_data import TinyCaptionData

    x, caps = TinyCaptionData(64, seed=12345).batch(0, 16)
    with torch.no_grad():
        x0 = lm.encoder.encode(x)
        g = torch.Generator().manual_seed(0)
        eps = torch.randn(x0.shape, generator=g)
        s = torch.linspace(0.1, 0.9, 16)
        xt = (1 - s[:, None, None, None]) * x0 + s[:, None, None, None] * eps
        text = tiny.build_text_encoder().encode(caps)
        ids = torch.zeros(64, 3, dtype=torch.float64)
        ids[:, 1], ids[:, 2] = torch.arange(8).repeat_interleave(8), torch.arange(8).repeat(8)
        losses = {}
        for name, model in (("pretrained", lm.transformer), ("untrained", build_model(0).eval())):
            v = predict(model, xt, s, text, ids)
            losses[name] = float(((v - (eps - x0)) ** 2).mean())
    assert losses["pretrained"] < 0.6 * losses["untrained"], losses


def _sample(lm, prompt, seeds=(0, 1)):
    how = sampling_defaults(lm)
    lat = sample_latents(
        lm.family,
        lm.transformer,
        lm.encode_prompt(prompt),
        latent_side=16,
        channels=16,
        seeds=list(seeds),
        steps=12,
        uncond=lm.encode_prompt(""),
        **how,
    )
    return decode(lm.encoder, lat)


def test_samples_follow_the_caption_colours(lm):
    """A caption's background colour dominates its samples (the colours are in [-1, 1] RGB)."""
    yellow = _sample(lm, "a big blue square on a yellow background").mean(dim=(0, 2, 3))
    blue = _sample(lm, "three white circles on a blue background").mean(dim=(0, 2, 3))
    assert yellow[0] > yellow[2] + 0.3 and yellow[1] > yellow[2] + 0.3  # red + green >> blue
    assert blue[2] > blue[0] + 0.3  # blue >> red


def test_guidance_needs_the_empty_prompt_and_cfg_one_is_plain(lm):
    t = lm.encode_prompt("a photo of a flower")
    with pytest.raises(ValueError, match="uncond"):
        sample_latents(lm.family, lm.transformer, t, latent_side=8, channels=16, seeds=[0], steps=2, cfg=2.0)
    a = sample_latents(lm.family, lm.transformer, t, latent_side=8, channels=16, seeds=[0], steps=2)
    b = sample_latents(
        lm.family,
        lm.transformer,
        t,
        latent_side=8,
        channels=16,
        seeds=[0],
        steps=2,
        cfg=1.0,
        uncond=lm.encode_prompt(""),
    )
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_dry_run_spec_matches_the_loaded_model(lm):
    from blockskip.export.memory.specs import load_spec

    spec, defaults = load_spec("tiny")
    assert spec.family.num_blocks == lm.family.num_blocks
    assert spec.encoder_spec == lm.encoder_spec
    assert defaults["s_min"] == 64 and defaults["s_max"] == 128


def test_skip_ratio_takes_the_selection_table_split(tmp_path, monkeypatch, capsys):
    from blockskip.export import cli
    from blockskip.export import select as sel

    table = {"model": "tiny", "num_blocks": 9, "ratios": {"0.3": {"front": 3, "back": 0, "scores": {}}}}
    monkeypatch.setattr(sel, "SELECTION_DIR", tmp_path / "sel")
    sel.write_table(table, tmp_path / "sel" / "tiny.json")
    rc = cli.main(
        [
            "--model",
            "tiny",
            "--profile",
            "desktop-cpu",
            "--prompt",
            "a photo of sks cat",
            "--skip-ratio",
            "0.3",
            "--rank",
            "4",
            "--base-quant",
            "none",
            "--checkpointing",
            "off",
            "--samples",
            "2",
            "-o",
            str(tmp_path / "b"),
        ]
    )
    assert rc == 0
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert (manifest["plan"]["front_skip"], manifest["plan"]["back_skip"]) == (3, 0)
    assert "selection table" in capsys.readouterr().err
    rc = cli.main(
        ["--model", "tiny", "--prompt", "x", "--skip-ratio", "0.3", "-n", "1", "-o", str(tmp_path / "c")]
    )
    assert rc == 2 and "--skip-ratio" in capsys.readouterr().err


def test_demo_photos_are_the_chelsea_views(tmp_path):
    pytest.importorskip("skimage")
    from PIL import Image

    from bench.make_demo_images import main as make_photos

    make_photos([str(tmp_path / "p"), str(tmp_path / "h")])
    train = sorted((tmp_path / "p").glob("*.png"))
    held = sorted((tmp_path / "h").glob("*.png"))
    assert len(train) >= 6 and len(held) >= 3
    a = {np.asarray(Image.open(p)).tobytes() for p in train}
    assert not a & {
        np.asarray(Image.open(p)).tobytes() for p in held
    }  # held-out views are not training views
