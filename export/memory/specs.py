"""Model specs for the dry run: structure and shapes only, from shipped configs or a folder's configs."""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from blockskip.export.memory.dryrun import ModelSpec
from blockskip.runtime.backends.torch_families import family_of_class, get_family
from blockskip.runtime.errors import ModelError

KNOWN = ("flux-dev", "sd3-medium", "sd35-medium", "sana-1.6b")
DEFAULT_PROMPTS = {
    "flux": {"prompt_embeds": [1, 512, 4096], "pooled": [1, 768]},
    "sd3": {"prompt_embeds": [1, 333, 4096], "pooled": [1, 2048]},
    "sana": {"prompt_embeds": [1, 300, 2304]},
}


def _vae_spec(vae: dict) -> tuple[dict, int]:
    """A VAE config file -> (encoder spec, downsampling), with the VAE class's constructor defaults filled
    in, read as the export reads a loaded VAE (``families.base.vae_spec``)."""
    import inspect

    import diffusers

    from blockskip.export.families.base import vae_key, vae_spec

    cls = vae.get("_class_name", "AutoencoderKL")
    vae_key(cls)
    cfg = {k: v for k, v in vae.items() if not k.startswith("_")}
    # the class's config is its constructor's arguments: the defaults, then the file's values (building
    # the module, even on the meta device, takes seconds)
    params = inspect.signature(getattr(diffusers, cls).__init__).parameters.values()
    full = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    full.update(cfg)
    return vae_spec(cls, full)


def load_spec(model: str) -> tuple[ModelSpec, dict]:
    """``tiny``, ``tiny-random``, a known name, or a local diffusers folder -> (ModelSpec, default plan
    settings)."""
    prompt: dict | None  # input name -> shape; None: the family's default
    if model == "tiny":
        from blockskip.export.tiny import LATENT, TEXT, pretrained_config
        from blockskip.runtime.backends.torch_families.latent import PatchDCTAutoencoder

        cfg = pretrained_config()
        fam = get_family("flux", cfg)
        enc = {"class": "PatchDCTAutoencoder", "config": dict(LATENT)}
        prompt = {
            "prompt_embeds": (1, TEXT["tokens"], cfg["joint_attention_dim"]),
            "pooled": (1, cfg["pooled_projection_dim"]),
        }
        return ModelSpec(fam, enc, prompt, PatchDCTAutoencoder.factor, "tiny"), {
            "s_min": 64,
            "s_max": 128,
            "dtype": "float32",
        }
    if model == "tiny-random":
        from blockskip.export.tiny import TEXT_TOKENS, TINY_FLUX, TINY_LATENT

        fam = get_family("flux", dict(TINY_FLUX))
        enc = {"class": "TinyAutoencoder", "config": dict(TINY_LATENT)}
        prompt = {
            "prompt_embeds": (1, TEXT_TOKENS, TINY_FLUX["joint_attention_dim"]),
            "pooled": (1, TINY_FLUX["pooled_projection_dim"]),
        }
        return ModelSpec(fam, enc, prompt, TINY_LATENT["factor"], "tiny-random"), {
            "s_min": 64,
            "s_max": 128,
            "dtype": "float32",
        }
    if model in KNOWN:
        d = json.loads((resources.files("blockskip.export") / "configs" / f"{model}.json").read_text())
        tr, vae, prompt, defaults = d["transformer"], d["vae"], d["prompt"], d.get("defaults", {})
    else:
        root = Path(model)
        try:
            tr = json.loads((root / "transformer" / "config.json").read_text())
            vae = json.loads((root / "vae" / "config.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise ModelError(
                f"--model {model!r} is neither a known config ({', '.join(('tiny', 'tiny-random') + KNOWN)}) nor a diffusers "
                f"folder with readable transformer/config.json and vae/config.json ({e})"
            ) from e
        prompt, defaults = None, {}
    fam_name = family_of_class(tr.get("_class_name", ""))
    fam = get_family(fam_name, {k: v for k, v in tr.items() if not k.startswith("_")})
    enc, factor = _vae_spec(vae)
    prompt = {k: tuple(v) for k, v in (prompt or DEFAULT_PROMPTS[fam_name]).items()}
    return ModelSpec(fam, enc, prompt, factor, model), defaults
