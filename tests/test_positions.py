"""Crop-aware positions: exact at scale 1, and they follow where the crop sits."""

import pytest
import torch
from tiny_models import FAMILY, build

from blockskip.runtime.backends.torch_families import get_family
from blockskip.runtime.backends.torch_families.base import CropGeometry, crop_coords


def _embed(name, geom, positions):
    m = build(name)
    fam = get_family(FAMILY[name], dict(m.config))
    text = {
        "prompt_embeds": torch.randn(1, 5, 24, generator=torch.Generator().manual_seed(0)),
        "pooled": torch.randn(1, 12, generator=torch.Generator().manual_seed(1)),
    }
    lat = torch.randn(1, 4, geom.low, geom.low, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t = fam.prepare_text(m, text)
        return fam.embed(m, lat, torch.tensor([0.5]), t, geom, positions, 3.5)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_crop_positions_equal_native_when_the_crop_is_not_resized(name):
    geom = CropGeometry(full=8, side=8, top=0, left=0, low=8)
    s_crop, c_crop = _embed(name, geom, "crop")
    s_nat, c_nat = _embed(name, geom, "native")
    torch.testing.assert_close(s_crop["hidden"], s_nat["hidden"], rtol=0, atol=1e-6)
    for k in c_nat:
        torch.testing.assert_close(c_crop[k], c_nat[k], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_crop_positions_depend_on_crop_origin_and_scale(name):
    a, ca = _embed(name, CropGeometry(full=16, side=8, top=0, left=0, low=8), "crop")
    b, cb = _embed(name, CropGeometry(full=16, side=8, top=8, left=4, low=8), "crop")
    c, cc = _embed(name, CropGeometry(full=16, side=16, top=0, left=0, low=8), "crop")
    key = "rope_cos" if name == "flux" else None
    if key:
        assert not torch.allclose(ca[key], cb[key]) and not torch.allclose(ca[key], cc[key])
    else:
        assert not torch.allclose(a["hidden"], b["hidden"]) and not torch.allclose(a["hidden"], c["hidden"])


def test_crop_coords_map_token_centres():
    rows, cols = crop_coords(CropGeometry(full=16, side=16, top=0, left=0, low=8), 2, "crop")
    # 8 full-res tokens resized to 4: centres at 0.5, 2.5, 4.5, 6.5
    assert rows.tolist() == [0.5, 2.5, 4.5, 6.5] and cols.tolist() == rows.tolist()
    rows, cols = crop_coords(CropGeometry(full=16, side=8, top=4, left=8, low=8), 2, "crop")
    assert rows.tolist() == [2, 3, 4, 5] and cols.tolist() == [4, 5, 6, 7]
