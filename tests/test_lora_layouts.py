"""LoRA layouts (``runtime.lora_layouts``): each one gives the same effective weight delta as the
diffusers/peft LoRA training writes.

Where diffusers 0.42.1 has a loader for a layout, the file goes through that loader into a pipeline
assembled from tiny components, and the delta of every LoRA Linear is read back from peft:
- diffusers naming: FLUX, SD3, SD3.5 and SANA;
- kohya naming: FLUX (``_convert_kohya_flux_lora_to_diffusers``), double blocks only: diffusers splits a
  single block's ``linear1`` at FLUX.1's fixed sizes (3 x 3072 + 12288), which a tiny model does not have.
diffusers has no loader for kohya-named SD3 or SANA LoRAs, nor for ComfyUI's ``diffusion_model.`` keys
of these three families: those (and FLUX single blocks) are held by the round trip through the one
declared mapping instead (fused A stacked, B block-diagonal, split back exactly).
"""

import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import FAMILY, build  # noqa: E402

from blockskip.runtime import lora_layouts as L  # noqa: E402
from blockskip.runtime.errors import BlockSkipError  # noqa: E402

RANK = 3


def random_lora(model, family: str, rng, blocks=None, drop=()) -> dict[str, np.ndarray]:
    """A diffusers-named LoRA on every module of the declared mapping the model has (``blocks``: only
    those diffusers block prefixes; ``drop``: module suffixes left out, as training leaves out the last
    block's text-only modules)."""
    out = {}
    for dblock, _, table in L.ORIGINAL[family]:
        if blocks is not None and dblock not in blocks:
            continue
        n = len(model.get_submodule(dblock))
        for i in range(n):
            for parts in table.values():
                for part in parts:
                    name = f"{dblock}.{i}.{part.module}"
                    if any(name.endswith(d) for d in drop):
                        continue
                    try:
                        lin = model.get_submodule(name)
                    except AttributeError:
                        continue  # SD3 without attn2, a last block without text outputs
                    if not isinstance(lin, torch.nn.Linear):
                        continue
                    out[f"transformer.{name}.lora_A.weight"] = rng.standard_normal(
                        (RANK, lin.in_features)
                    ).astype(np.float32)
                    out[f"transformer.{name}.lora_B.weight"] = rng.standard_normal(
                        (lin.out_features, RANK)
                    ).astype(np.float32)
    assert out
    return out


def deltas(sd: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        k[len("transformer.") : -len(".lora_A.weight")]: sd[k.replace("lora_A", "lora_B")] @ sd[k]
        for k in sd
        if k.endswith(".lora_A.weight")
    }


def pipeline(name: str, model):
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        SanaPipeline,
        StableDiffusion3Pipeline,
    )

    sched = FlowMatchEulerDiscreteScheduler()
    fam = FAMILY[name]
    if fam == "flux":
        return FluxPipeline(
            scheduler=sched,
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=model,
        )
    if fam == "sd3":
        return StableDiffusion3Pipeline(
            transformer=model,
            scheduler=sched,
            vae=None,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
        )
    return SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model, scheduler=sched)


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_and_read(name: str, model, state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Load through the pipeline's own ``load_lora_weights``; the delta of every LoRA Linear, and what
    diffusers logged about unexpected, missing or unsupported keys."""
    pipe = pipeline(name, model)
    rec = Records()
    log = logging.getLogger("diffusers")
    log.addHandler(rec)
    try:
        pipe.load_lora_weights({k: torch.from_numpy(v.copy()) for k, v in state.items()}, adapter_name="x")
    finally:
        log.removeHandler(rec)
    got = {}
    for mod_name, mod in model.named_modules():
        if hasattr(mod, "lora_A") and "x" in mod.lora_A:
            d = mod.lora_B["x"].weight @ mod.lora_A["x"].weight * mod.scaling["x"]
            got[mod_name] = d.detach().numpy()
    # the pipeline has no text encoder, so diffusers notes that no key is for one: not about our keys
    bad = [
        m
        for m in rec.messages
        if "prefix='text_encoder" not in m
        and any(
            w in m.lower() for w in ("unexpected", "missing", "unsupported", "incompatible", "not loaded")
        )
    ]
    return got, bad


def assert_same_deltas(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
    assert set(ref) <= set(got), sorted(set(ref) - set(got))
    for k, d in got.items():
        want = ref.get(k, np.zeros_like(d))  # a fused part the LoRA did not cover loads as zero
        assert np.abs(d - want).max() < 1e-6, k


@pytest.mark.parametrize("name", ["flux", "sd3", "sd35", "sana"])
def test_diffusers_layout_loads_into_the_pipeline(name):
    model = build(name)
    sd = random_lora(model, FAMILY[name], np.random.default_rng(0))
    got, bad = load_and_read(name, model, sd)
    assert not bad, bad
    assert set(got) == set(deltas(sd))
    assert_same_deltas(deltas(sd), got)


def test_kohya_flux_loads_through_diffusers_converter():
    model = build("flux")
    # the last trained block's text-only modules are not trained: its fused txt qkv has a zero q part
    sd = random_lora(
        model,
        "flux",
        np.random.default_rng(1),
        blocks={"transformer_blocks"},
        drop=("1.attn.add_q_proj", "1.attn.to_add_out", "1.ff_context.net.0.proj", "1.ff_context.net.2"),
    )
    kohya = L.from_diffusers(sd, "flux", "kohya")
    assert all(k.startswith("lora_unet_double_blocks_") for k in kohya)
    assert "lora_unet_double_blocks_0_img_attn_qkv.alpha" in kohya
    got, bad = load_and_read("flux", model, kohya)
    assert not bad, bad
    assert_same_deltas(deltas(sd), got)


@pytest.mark.parametrize("name", ["flux", "sd3", "sd35", "sana"])
@pytest.mark.parametrize("fmt", ["kohya", "comfy"])
def test_round_trip_through_the_declared_mapping(name, fmt):
    fam = FAMILY[name]
    model = build(name)
    sd = random_lora(model, fam, np.random.default_rng(2), drop=("1.attn.add_q_proj",))
    conv = L.from_diffusers(sd, fam, fmt)
    stem = L.PREFIX[fmt]
    assert all(k.startswith(stem) for k in conv)
    # every fused Linear has the original checkpoint's full size: A stacked, B block-diagonal
    for k, v in conv.items():
        if k.endswith(".lora_up.weight"):
            down = conv[k.replace("lora_up", "lora_down")]
            assert v.shape[1] == down.shape[0] == float(conv[k.replace(".lora_up.weight", ".alpha")])
    back = L.to_diffusers(conv, fam, fmt)
    assert set(back) == set(sd)
    for k in sd:
        np.testing.assert_array_equal(back[k], sd[k])


def test_flux_fused_names_and_shapes():
    model = build("flux")
    sd = random_lora(
        model, "flux", np.random.default_rng(3), blocks={"single_transformer_blocks"}, drop=("proj_mlp",)
    )
    comfy = L.from_diffusers(sd, "flux", "comfy")
    up = comfy["diffusion_model.single_blocks.0.linear1.lora_up.weight"]
    dim = model.single_transformer_blocks[0].attn.to_q.out_features
    assert up.shape == (3 * dim + 4 * dim, 4 * RANK)  # proj_mlp missing: zero rows keep linear1's size
    assert not up[3 * dim :].any()
    assert "diffusion_model.single_blocks.0.linear2.lora_down.weight" in comfy


def test_unknown_module_and_format_are_refused():
    with pytest.raises(BlockSkipError, match="no place"):
        L.from_diffusers(
            {
                "transformer.x_embedder.lora_A.weight": np.zeros((1, 2), np.float32),
                "transformer.x_embedder.lora_B.weight": np.zeros((2, 1), np.float32),
            },
            "flux",
            "kohya",
        )
    with pytest.raises(BlockSkipError, match="unknown LoRA format"):
        L.formats_of("a1111")


def test_the_native_header_is_generated_from_the_declaration():
    root = Path(__file__).resolve().parents[1]
    assert (root / L.HEADER).read_text() == L.cpp_header(), (
        "run python -m blockskip.runtime.lora_layouts --write"
    )
