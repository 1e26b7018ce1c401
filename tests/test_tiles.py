"""Tiled photo encoding on the program backends: the numpy tiling (runtime.tiles) reproduces diffusers'
tiled DC-AE and KL encodes the torch backend runs, and the pte / onnx encoder programs of each tile shape
give the same latents through it."""

import types

import numpy as np
import pytest
import torch

from blockskip.runtime.backends.torch_families.latent import enable_tiling, encode_images
from blockskip.runtime.plan import Plan
from blockskip.runtime.tiles import TILE, encode_photos, encode_tiled, stride_for, tile_shapes, tile_spans

KINDS = {"AutoencoderDC": 4, "AutoencoderKL": 2}  # the tiny encoders' compression ratios


def _vae(kind: str = "AutoencoderDC"):
    from tiny_models import tiny_vae

    vae = tiny_vae(kind, 4).eval()
    spec = {
        "class": kind,
        "config": dict(vae.config),
        "scaling_factor": vae.config.scaling_factor,
        "shift_factor": getattr(vae.config, "shift_factor", None),
    }
    return vae, spec


def _torch_tiled(vae, spec, x):
    vae.enable_tiling()
    enable_tiling(vae, spec)
    try:
        with torch.no_grad():
            return encode_images(vae, spec, x).numpy()
    finally:
        vae.disable_tiling()


def test_tile_grid():
    # 512 px, stride 224: tiles at 0, 224, 448; the last is 64 px
    assert tile_spans(512, 4) == [(0, 256), (224, 256), (448, 64)]
    assert tile_shapes(512, 4) == [(256, 256), (256, 64), (64, 256), (64, 64)]
    assert tile_spans(1024, 32)[-1] == (896, 128)
    assert tile_spans(200, 32) == [(0, 224)]  # a short edge is padded to the compression ratio


@pytest.mark.parametrize("kind", KINDS)
def test_numpy_tiling_matches_diffusers_tiled_encode(kind):
    vae, spec = _vae(kind)
    ratio = KINDS[kind]
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    ref = _torch_tiled(vae, spec, x)
    with torch.no_grad():
        untiled = encode_images(vae, spec, x).numpy()

    def tile(t):
        with torch.no_grad():
            return encode_images(vae, spec, torch.from_numpy(t)).numpy()

    ours = encode_tiled(x.numpy(), tile, ratio, TILE, stride_for(kind))
    assert ours.shape == ref.shape == (1, 4, 512 // ratio, 512 // ratio)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert np.abs(untiled - ref).max() > 1e-3  # tiling changes the latents: the check above has teeth


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_tile_programs_give_the_torch_backends_latents(fmt, kind, tmp_path):
    vae, spec = _vae(kind)
    ratio = KINDS[kind]
    lm = types.SimpleNamespace(encoder=vae, encoder_spec=spec, vae_factor=ratio)
    plan = Plan(s_min=256, s_max=512, vae_tiling=True)
    files: list[str] = []
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
        from blockskip.export.onnx_export import OnnxFormat
        from blockskip.runtime.backends.ort import _session

        sec = OnnxFormat().encoder(tmp_path, lm, plan, files)

        def load(rel):
            return _session(tmp_path / rel)

        def run(s, x):
            return s.run(None, {"images": x})[0]
    else:
        pytest.importorskip("executorch.exir")
        from blockskip.export.pte_export import PteFormat
        from blockskip.runtime.backends.executorch import _load_program

        sec = PteFormat("none").encoder(tmp_path, lm, plan, files)

        def load(rel):
            return _load_program(tmp_path / rel)

        def run(p, x):
            return p.forward([torch.from_numpy(x)])[0].numpy()

    assert sorted(sec["programs"]) == sorted(f"{h}x{w}" for h, w in tile_shapes(512, ratio, stride_for(kind)))
    assert sec["tiles"] == {"tile": TILE, "stride": stride_for(kind), "ratio": ratio} and len(files) == 4
    x = torch.rand(2, 3, 512, 512) * 2 - 1
    got = encode_photos(sec, x.numpy(), load, run)
    ref = np.concatenate([_torch_tiled(vae, spec, x[i : i + 1]) for i in range(2)])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_encoder_programs_by_class():
    """KL encoders tile every 192 px (diffusers' overlap factor 0.25), DC-AE every 224; another class is
    refused for tiling with what works."""
    from blockskip.export.graphs import encoder_inputs
    from blockskip.runtime.errors import PlanError

    kl = types.SimpleNamespace(encoder=None, encoder_spec={"class": "AutoencoderKL"}, vae_factor=8)
    assert tile_spans(1024, 8, TILE, stride_for("AutoencoderKL")) == [
        (s, 256) for s in range(0, 960, 192)
    ] + [(960, 64)]
    assert [s for _, s in encoder_inputs(kl, Plan(s_min=256, s_max=1024, vae_tiling=True))] == [
        (1, 3, 256, 256),
        (1, 3, 256, 64),
        (1, 3, 64, 256),
        (1, 3, 64, 64),
    ]
    assert encoder_inputs(kl, Plan(s_min=256, s_max=512)) == [("encoder", (1, 3, 512, 512))]
    other = types.SimpleNamespace(encoder=None, encoder_spec={"class": "AutoencoderTiny"}, vae_factor=8)
    with pytest.raises(PlanError, match="AutoencoderKL"):
        encoder_inputs(other, Plan(s_min=256, s_max=512, vae_tiling=True))
