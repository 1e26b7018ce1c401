"""Tiled photo encoding on the program backends: the numpy tiling (runtime.tiles) reproduces diffusers'
tiled DC-AE encode the torch backend runs, and the pte / onnx encoder programs of each tile shape give
the same latents through it."""

import types

import numpy as np
import pytest
import torch

from blockskip.runtime.backends.torch_families.latent import enable_tiling, encode_images
from blockskip.runtime.plan import Plan
from blockskip.runtime.tiles import encode_photos, encode_tiled, tile_shapes, tile_spans


def _dc():
    from tiny_models import tiny_vae

    vae = tiny_vae("AutoencoderDC", 4).eval()
    spec = {"class": "AutoencoderDC", "config": dict(vae.config), "scaling_factor": 0.41, "shift_factor": None}
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


def test_numpy_tiling_matches_diffusers_tiled_encode():
    vae, spec = _dc()
    x = torch.rand(1, 3, 512, 512) * 2 - 1
    ref = _torch_tiled(vae, spec, x)
    with torch.no_grad():
        untiled = encode_images(vae, spec, x).numpy()

    def tile(t):
        with torch.no_grad():
            return encode_images(vae, spec, torch.from_numpy(t)).numpy()

    ours = encode_tiled(x.numpy(), tile, 4)
    assert ours.shape == ref.shape == (1, 4, 128, 128)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert np.abs(untiled - ref).max() > 1e-3  # tiling changes the latents: the check above has teeth


@pytest.mark.parametrize("fmt", ["onnx", "pte"])
def test_tile_programs_give_the_torch_backends_latents(fmt, tmp_path):
    vae, spec = _dc()
    lm = types.SimpleNamespace(encoder=vae, encoder_spec=spec, vae_factor=4)
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

    assert sorted(sec["programs"]) == sorted(f"{h}x{w}" for h, w in tile_shapes(512, 4))
    assert sec["tiles"]["ratio"] == 4 and len(files) == 4
    x = torch.rand(2, 3, 512, 512) * 2 - 1
    got = encode_photos(sec, x.numpy(), load, run)
    ref = np.concatenate([_torch_tiled(vae, spec, x[i:i + 1]) for i in range(2)])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)


def test_kl_encoder_tiling_is_refused_for_the_program_formats():
    from blockskip.export.graphs import encoder_inputs
    from blockskip.runtime.errors import PlanError

    lm = types.SimpleNamespace(encoder=None, encoder_spec={"class": "AutoencoderKL"}, vae_factor=8)
    with pytest.raises(PlanError, match="DC-AE"):
        encoder_inputs(lm, Plan(s_min=256, s_max=512, vae_tiling=True))
    assert encoder_inputs(lm, Plan(s_min=256, s_max=512)) == [("encoder", (1, 3, 512, 512))]
