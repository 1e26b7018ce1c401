"""The fixed patch-DCT latent mapping and the captioned pretraining data of the built-in model."""

import numpy as np
import pytest
import torch

from blockskip.runtime.backends.torch_families.latent import (
    PatchDCTAutoencoder,
    build_encoder_skeleton,
    encode_images,
)

tiny_data = pytest.importorskip("tools.tiny_data")


def test_dct_rows_are_orthonormal_and_decode_is_the_least_squares_inverse():
    ae = PatchDCTAutoencoder()
    w = ae.enc.weight.reshape(ae.latent_channels, -1).double()
    torch.testing.assert_close(w @ w.T, torch.eye(ae.latent_channels, dtype=torch.float64), atol=1e-6, rtol=0)
    z = torch.randn(2, ae.latent_channels, 4, 4)
    torch.testing.assert_close(
        ae.encode(ae.decode(z)), z, atol=1e-4, rtol=1e-4
    )  # latents survive a round trip
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    # decode(encode(x)) is the projection onto the kept frequencies: applying it twice changes nothing
    p = ae.decode(ae.encode(x))
    torch.testing.assert_close(ae.decode(ae.encode(p)), p, atol=1e-5, rtol=1e-5)


def test_dct_keeps_smooth_images_and_normalises_photos():
    ae = PatchDCTAutoencoder()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 32), torch.linspace(-1, 1, 32), indexing="ij")
    smooth = torch.stack([0.6 * xx, 0.6 * yy, 0.3 * xx * yy])[None]
    err = (ae.decode(ae.encode(smooth)) - smooth).abs().max()
    assert err < 0.05  # a smooth image lives in the low frequencies
    skimage = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skimage.astronaut()[:256, :256].astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[
        None
    ]
    with torch.no_grad():
        z = ae.encode(img)
    assert 0.3 < float(z.std()) < 3.0  # about unit scale on a natural photo


def test_dct_encoder_through_the_bundle_path():
    spec = {"class": "PatchDCTAutoencoder", "config": PatchDCTAutoencoder().config}
    skel = build_encoder_skeleton(spec)
    assert isinstance(skel, PatchDCTAutoencoder) and skel.latent_channels == 16
    ae = PatchDCTAutoencoder()
    x = torch.rand(1, 3, 8, 8) * 2 - 1
    torch.testing.assert_close(encode_images(ae, spec, x), ae.encode(x))


def test_caption_data_is_a_pure_function_of_seed_and_step():
    d = tiny_data.TinyCaptionData(size=64, seed=3)
    a_img, a_cap = d.batch(5, 4)
    b_img, b_cap = tiny_data.TinyCaptionData(size=64, seed=3).batch(5, 4)
    assert a_cap == b_cap and torch.equal(a_img, b_img)
    c_img, c_cap = d.batch(6, 4)
    assert c_cap != a_cap or not torch.equal(c_img, a_img)
    assert a_img.shape == (4, 3, 64, 64) and float(a_img.min()) >= -1 and float(a_img.max()) <= 1
    assert all(isinstance(c, str) and c for c in a_cap)


def test_captions_never_show_the_demo_subject():
    d = tiny_data.TinyCaptionData(size=64, seed=0)
    caps = [c for s in range(8) for c in d.batch(s, 16)[1]]
    assert not any("cat" in tiny_data.words_of(c) for c in caps)
