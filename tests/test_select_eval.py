"""Block selection by cross-attention masking, the Euler sampler and the fidelity evaluation."""

import json

import numpy as np
import pytest
import torch
from tiny_models import build

from blockskip.export import select as sel
from blockskip.export.evaluate import evaluate, heldout_loss
from blockskip.export.families import load_model, wrap_model
from blockskip.export.features import cosine, image_features
from blockskip.export.memory.search import fixed_axes
from blockskip.export.sampling import sample_latents, sigmas


def _block_io(lm, i, enc_seed):
    fam, model = lm.family, lm.transformer
    torch.manual_seed(0)
    x = torch.randn(1, lm.latent_channels, 8, 8)
    text = lm.encode_prompt("a red circle")
    from blockskip.runtime.backends.torch_families.base import CropGeometry

    with torch.no_grad():
        prepared = fam.prepare_text(model, text)
        g = torch.Generator().manual_seed(enc_seed)
        prepared["encoder"] = torch.randn(prepared["encoder"].shape, generator=g)
        st, cs = fam.embed(model, x, torch.tensor([0.5]), prepared, CropGeometry(8, 8, 0, 0, 8), "crop", 3.5)
        if fam.name == "sana":
            cs = dict(cs, encoder=prepared["encoder"])
        for b in range(i):
            st = fam.run_block(model, b, st, cs)
        return fam.run_block(model, i, st, cs)["hidden"]


@pytest.mark.parametrize("name, blocks", [("flux", [0, 3]), ("sana", [1]), ("sd3", [0, 1]), ("sd35", [0, 1])])
def test_masked_block_ignores_the_text(name, blocks):
    """With image->text attention masked, a block's image output no longer depends on the text."""
    lm = wrap_model(build(name), name)
    n_text = lm.encode_prompt("x")["prompt_embeds"].shape[1]
    for i in blocks:
        a, b = _block_io(lm, i, 1), _block_io(lm, i, 2)
        assert (a - b).abs().max() > 1e-4  # unmasked: the text matters
        with sel.text_masked(lm.family, lm.transformer, list(range(i + 1)), n_text):
            a, b = _block_io(lm, i, 1), _block_io(lm, i, 2)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    # and the processors are restored afterwards
    a, b = _block_io(lm, blocks[0], 1), _block_io(lm, blocks[0], 2)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("name", ["sd3", "sd35"])
def test_our_sd3_joint_attention_equals_diffusers_unmasked(name):
    """Masking SD3 needs our own joint-attention processor; unmasked it is diffusers' computation."""
    lm = wrap_model(build(name), name)
    ref = [_block_io(lm, i, 1) for i in range(2)]
    attns = [lm.transformer.get_submodule(p).attn for p in lm.family.block_paths()]
    old = [a.processor for a in attns]
    try:
        for a in attns:
            a.processor = sel._TextMaskedSD3Joint(mask=False)
        got = [_block_io(lm, i, 1) for i in range(2)]
    finally:
        for a, o in zip(attns, old):
            a.processor = o
    for r, g in zip(ref, got):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)


def test_sigmas_and_sampler_are_deterministic():
    s = sigmas(4)
    assert s[0] == 1.0 and s[-1] == 0.0 and all(a > b for a, b in zip(s, s[1:]))
    lm = load_model("tiny-random")
    t = lm.encode_prompt("a photo of a cat")
    a = sample_latents(lm.family, lm.transformer, t, latent_side=8, channels=8, seeds=[3, 4], steps=3)
    b = sample_latents(lm.family, lm.transformer, t, latent_side=8, channels=8, seeds=[3, 4], steps=3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == (2, 8, 8, 8) and (a[0] - a[1]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def table():
    lm = load_model("tiny-random")
    return sel.select(
        lm,
        ratios=[0.3, 0.5],
        prompts=["a red circle", "a photo of a cat"],
        seeds=[0],
        steps=3,
        features="pixels",
        size=32,
    )


def test_selection_table_picks_the_argmin(table):
    L = 6
    for r, v in table["ratios"].items():
        k = round(float(r) * L)
        assert v["front"] + v["back"] == k
        assert len(v["scores"]) == k + 1  # every split n + m = k was scored
        assert min(v["scores"].values()) == v["scores"][f"{v['front']},{v['back']}"]
        assert max(v["scores"].values()) > 0  # masking moved the samples
    assert table["num_blocks"] == L and table["features"] == "pixels"


def test_planner_reads_the_committed_table(table, tmp_path, monkeypatch):
    monkeypatch.setattr(sel, "SELECTION_DIR", tmp_path)
    assert "split_table" not in fixed_axes(6, model="tiny")
    sel.write_table(table, tmp_path / "tiny.json")
    kw = fixed_axes(6, model="tiny")
    for r, v in table["ratios"].items():
        assert kw["split_table"][r] == (v["front"], v["back"])
        assert float(r) in kw["ratios"]
    assert "split_table" not in fixed_axes(7, model="tiny")  # another block count: not this table
    # the user's own split wins over the table
    assert fixed_axes(6, split=(1, 1), model="tiny")["split_table"] == {str(2 / 6): (1, 1)}


def test_shipped_selection_tables_match_their_models():
    for path in sel.SELECTION_DIR.glob("*.json"):
        t = json.loads(path.read_text())
        for r, v in t["ratios"].items():
            assert v["front"] + v["back"] == round(float(r) * t["num_blocks"])
            assert v["scores"][f"{v['front']},{v['back']}"] == min(v["scores"].values())


def test_select_cli(tmp_path, capsys):
    out = tmp_path / "t.json"
    rc = sel.main(
        [
            "--ratios",
            "0.3",
            "--seeds",
            "0",
            "--steps",
            "2",
            "--size",
            "32",
            "--features",
            "pixels",
            "-o",
            str(out),
        ]
    )
    assert rc == 0
    assert json.loads(out.read_text())["ratios"]["0.3"]["front"] >= 0
    assert "| 0.3 |" in capsys.readouterr().out
    rc = sel.main(["--ratios", "1.5", "--features", "pixels"])
    assert rc == 2 and "ratio" in capsys.readouterr().err


def test_features_and_cosine():
    """Pixel features: the 32x32 image, mean-centred; cosine: pairwise, equal to numpy's; a mildly
    perturbed copy stays closer than an unrelated image."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 64, 64, generator=g) * 2 - 1
    f = image_features(x, "pixels")
    assert f.shape == (3, 3 * 32 * 32)
    # independent reference: 2x2 block means, flattened, minus the per-image mean
    ref = x.numpy().reshape(3, 3, 32, 2, 32, 2).mean(axis=(3, 5)).reshape(3, -1)
    ref = ref - ref.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(f.numpy(), ref, rtol=1e-5, atol=1e-6)
    assert (f[0] - f[1]).abs().max() > 0.1  # different images, different features
    near = image_features(x + 0.1 * torch.randn(x.shape, generator=g), "pixels")
    c = cosine(f, near)
    assert c.shape == (3, 3)
    a, b = f.numpy().astype(np.float64), near.numpy().astype(np.float64)
    want = (a @ b.T) / np.outer(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1))
    np.testing.assert_allclose(c.numpy(), want, rtol=1e-5, atol=1e-6)
    for i in range(3):  # each image is closest to its own perturbed copy, by a clear margin
        others = [c[i, j].item() for j in range(3) if j != i]
        assert c[i, i] > 0.9 and max(others) < c[i, i] - 0.5, c


def test_effnet_features_are_offline_imagenet_features():
    pytest.importorskip("efficientnet_lite_pytorch")
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    f = image_features(x, "effnet")
    assert f.shape == (2, 1280) and torch.isfinite(f).all()
    flipped = image_features(torch.flip(x, dims=[3]), "effnet")
    other = image_features(torch.zeros(2, 3, 64, 64), "effnet")
    # a mirror image stays closer than a blank one
    assert cosine(f, flipped).diagonal().mean() > cosine(f, other).diagonal().mean()


def test_evaluate_without_lora_is_unchanged_and_loss_is_a_real_mse():
    lm = load_model("tiny-random")
    views = torch.rand(2, 3, 32, 32) * 2 - 1
    scores, images = evaluate(
        lm,
        None,
        views,
        "a photo of sks cat",
        seeds=[0],
        steps=2,
        size=32,
        features="pixels",
        contrast=["a red circle"],
    )
    assert scores["before"] == scores["after"]
    torch.testing.assert_close(images["before"], images["after"])
    loss = heldout_loss(lm, views, lm.encode_prompt("a photo of sks cat"))
    assert loss == pytest.approx(scores["before"]["heldout_loss"])
    assert 0.1 < loss < 100


def test_the_planner_reads_the_shipped_tiny_table():
    """export/selection/tiny.json is what the plan search and --skip-ratio use for the built-in model."""
    from blockskip.export.memory.specs import load_spec

    path = sel.SELECTION_DIR / "tiny.json"
    t = json.loads(path.read_text())
    spec, _ = load_spec("tiny")
    assert t["model"] == "tiny" and t["num_blocks"] == spec.family.num_blocks
    kw = fixed_axes(spec.family.num_blocks, model="tiny")
    assert kw["split_table"] == {r: (v["front"], v["back"]) for r, v in t["ratios"].items()}
