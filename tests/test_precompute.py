"""The sample construction every precompute shares (``runtime/precompute.py``): the crop of the photo's
latent and its area resize to s_min, against torch's own area interpolation."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from blockskip.runtime.precompute import area_windows, crop_resize, residual_gaps
from blockskip.runtime.schedule import ScheduleEntry


@pytest.mark.parametrize("side", [32, 40, 48, 56, 64, 96, 128])
def test_crop_resize_is_torchs_area_interpolation(side):
    rng = np.random.default_rng(side)
    f, s_min, s_max = 8, 256, 1024
    latent = rng.standard_normal((16, s_max // f, s_max // f)).astype(np.float32) * 3
    top, left = min(8, s_max // f - side), min(3, s_max // f - side)
    e = ScheduleEntry(
        index=0, image=0, t=500, sigma=0.5, side=side * f, top=top * f, left=left * f, noise_seed=0
    )
    got = crop_resize(latent, e, s_min, s_max, f)
    crop = torch.from_numpy(latent)[None, :, top : top + side, left : left + side]
    ref = F.interpolate(crop.double(), size=(s_min // f, s_min // f), mode="area").float().numpy()
    assert got.shape == (1, 16, 32, 32) and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=0, atol=2e-6)
    if side == s_min // f:  # no resize: the crop itself, bit for bit
        np.testing.assert_array_equal(got, crop.numpy())


def test_area_windows_cover_the_input_like_adaptive_pooling():
    for n_in, n_out in [(40, 32), (33, 32), (64, 32), (100, 7)]:
        w = area_windows(n_in, n_out)
        assert w[0][0] == 0 and w[-1][1] == n_in
        assert all(a < b and b - a <= -(-n_in // n_out) + 1 for a, b in w)
        assert all(w[i][0] <= w[i + 1][0] and w[i][1] <= w[i + 1][1] for i in range(n_out - 1))


def test_residual_gaps():
    assert residual_gaps([2, 3, 4], 10) == [(5, 10)]
    assert residual_gaps([2, 3, 4], 10, back_residual=False) == []
    assert residual_gaps([1, 4], 6) == [(2, 4), (5, 6)]
