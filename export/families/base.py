"""Loading a model (``tiny`` or a local diffusers folder) into what the export needs."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from blockskip.runtime.backends.torch_families import family_of_class, get_family
from blockskip.runtime.backends.torch_families.base import DiffusersModel, TorchFamily
from blockskip.runtime.errors import ModelError, PlanError

if TYPE_CHECKING:
    from blockskip.export.folder_weights import FolderWeights
    from blockskip.runtime.backends.torch_families.latent import PatchDCTAutoencoder, TinyAutoencoder


@dataclass
class LoadedModel:
    name: str
    family: TorchFamily
    transformer: torch.nn.Module
    encoder: torch.nn.Module
    encoder_spec: dict  # class, config, scaling/shift factors
    vae_factor: int
    encode_prompt: Callable[[str], dict]
    #: a folder loaded for a streaming export: the transformer is a meta skeleton and its tensors are read
    #: from the shards part by part (``store()``), in ``dtype``
    weights: FolderWeights | None = None
    dtype: torch.dtype = torch.float32

    def store(self, as_stored: bool = False):
        """The device's BlockStore interface over this model's weights (load a block, use it, free it): an
        in-memory model's tensors (shared, no copies), or a folder's shards read part by part, so that no
        more than the parts loaded at once are in memory. ``as_stored``: a folder's tensors in the dtype its
        shards hold, where that converts exactly to ``dtype`` (float32: a bfloat16 block at half the
        memory, for code that casts each tensor itself, as the bundle's storage conversion does)."""
        if self.weights is not None:
            from blockskip.export.folder_weights import FolderStore

            return FolderStore(
                self.family, self.weights, None if as_stored and self.dtype == torch.float32 else self.dtype
            )
        from blockskip.export.graphs import ModelStore

        return ModelStore(self.family, self.transformer)

    def model_spec(self):
        """What the dry run needs of this model (``ModelSpec``: structure and shapes, no weights)."""
        from blockskip.export.memory.dryrun import ModelSpec

        prompt = self.encode_prompt("shape probe")
        return ModelSpec(
            self.family,
            self.encoder_spec,
            {k: tuple(v.shape) for k, v in prompt.items()},
            self.vae_factor,
            self.name,
        )

    @property
    def param_dtype(self) -> torch.dtype:
        """The dtype of the transformer's floating-point weights as the export reads them."""
        if self.weights is not None:
            return self.dtype
        return next((p.dtype for p in self.transformer.parameters() if p.is_floating_point()), torch.float32)

    @property
    def latent_channels(self) -> int:
        c = vars(self.encoder).get("latent_channels")  # the built-in mappings (diffusers VAEs: their config)
        return c if isinstance(c, int) else int(self.encoder_spec["config"]["latent_channels"])

    @property
    def granularity(self) -> int:
        return self.vae_factor * self.family.patch_size


def lora_target_names(family: TorchFamily, trained: list[int], targets: list[str] | None = None) -> list[str]:
    """Full module names to put LoRA on. The last trained block's text-only modules are left out:
    its text output only feeds skipped blocks, so they would get no gradient."""
    names = []
    paths = family.block_paths()
    for i in trained:
        allowed = family.lora_targets(i)
        chosen = [t for t in (targets or allowed) if t in allowed]
        if i == trained[-1]:
            chosen = [t for t in chosen if t not in family.text_output_only(i)]
        names += [f"{paths[i]}.{t}" for t in chosen]
    if not names:
        raise PlanError(
            f"no LoRA targets left in trained blocks {trained}; valid: {sorted(family.valid_targets())}"
        )
    return names


def load_model(
    spec: str, dtype: torch.dtype = torch.float32, seed: int = 0, stream: bool = False
) -> LoadedModel:
    """``tiny`` (the pretrained built-in model), ``tiny-random`` (seeded random, for tests) or a local
    diffusers folder. ``stream``: a folder's transformer stays on disk (a meta skeleton; the export reads
    its tensors part by part, ``LoadedModel.store``); block selection and evaluation need it loaded."""
    enc: PatchDCTAutoencoder | TinyAutoencoder
    if spec == "tiny":
        from blockskip.export import tiny

        tr = tiny.load_pretrained_transformer(dtype)
        enc = tiny.build_pretrained_encoder()
        return LoadedModel(
            "tiny",
            get_family("flux", dict(tr.config)),
            tr,
            enc,
            {"class": "PatchDCTAutoencoder", "config": enc.config},
            enc.factor,
            tiny.build_text_encoder(),
        )
    if spec == "tiny-random":
        from blockskip.export.tiny import TinyTextEncoder, build_tiny_encoder, build_tiny_transformer

        tr = build_tiny_transformer(seed, dtype)
        enc = build_tiny_encoder(seed)
        return LoadedModel(
            "tiny-random",
            get_family("flux", dict(tr.config)),
            tr,
            enc,
            {"class": "TinyAutoencoder", "config": enc.config},
            enc.factor,
            TinyTextEncoder(),
        )
    return _load_folder(Path(spec), dtype, stream)


def wrap_model(
    transformer: DiffusersModel,
    name: str = "in-memory",
    seed: int = 0,
    vae_factor: int | None = None,
    text_tokens: int | None = None,
) -> LoadedModel:
    """A LoadedModel for an in-memory diffusers transformer, with the tiny latent mapping and text encoder
    sized to it (tests and benchmarks)."""
    from blockskip.export.tiny import TinyTextEncoder
    from blockskip.runtime.backends.torch_families.latent import TinyAutoencoder

    family = get_family(family_of_class(type(transformer).__name__), dict(transformer.config))
    cfg = transformer.config
    channels = cfg.in_channels // 4 if family.name == "flux" else cfg.in_channels
    factor = vae_factor or (4 if channels <= 48 else 8)
    enc = TinyAutoencoder(factor=factor, latent_channels=channels, seed=seed).eval()
    text_dim = cfg.get("joint_attention_dim") or cfg.get("caption_channels")
    text: Callable[[str], dict] = TinyTextEncoder(
        dim=text_dim,
        pooled_dim=cfg.get("pooled_projection_dim") or 1,
        **({"tokens": text_tokens} if text_tokens else {}),
    )
    if family.name == "sana":
        base = text

        def text(prompt):  # SANA has no pooled embedding
            return {"prompt_embeds": base(prompt)["prompt_embeds"]}

    return LoadedModel(
        name,
        family,
        transformer.eval(),
        enc,
        {"class": "TinyAutoencoder", "config": enc.config},
        factor,
        text,
    )


def _load_folder(root: Path, dtype, stream: bool = False) -> LoadedModel:
    import diffusers

    cfg_path = root / "transformer" / "config.json"
    if not cfg_path.is_file():
        raise ModelError(
            f"{str(root)!r} is not a diffusers model folder (no transformer/config.json); "
            "use --model tiny (or tiny-random) or a local folder saved with save_pretrained"
        )
    cls_name = _read_config(cfg_path).get("_class_name", "")
    fam_name = family_of_class(cls_name)
    weights = None
    if stream:
        from blockskip.export.folder_weights import FolderWeights

        weights = FolderWeights(root / "transformer")
        cfg = {k: v for k, v in _read_config(cfg_path).items() if not k.startswith("_")}
        try:
            with torch.device("meta"):  # the config with diffusers' defaults, as from_pretrained fills it
                tr = getattr(diffusers, cls_name).from_config(cfg).eval().requires_grad_(False)
        except (ValueError, TypeError, KeyError) as e:
            raise ModelError(f"cannot build {cls_name} from {cfg_path}: {e}") from e
    else:
        tr = _from_pretrained(getattr(diffusers, cls_name), root / "transformer", dtype)
    family = get_family(fam_name, dict(tr.config))
    vae_dir = root / "vae"
    if not (vae_dir / "config.json").is_file():
        raise ModelError(f"{str(root)!r} has no vae/ folder: the device needs the VAE encoder")
    vae_cls = _read_config(vae_dir / "config.json").get("_class_name", "AutoencoderKL")
    vae_key(vae_cls)  # refuse another class before loading it
    vae = _from_pretrained(getattr(diffusers, vae_cls), vae_dir, torch.float32)
    spec, factor = vae_spec(vae_cls, dict(vae.config))
    return LoadedModel(
        root.name,
        family,
        tr,
        vae,
        spec,
        factor,
        _folder_prompt_encoder(root, fam_name, dtype),
        weights=weights,
        dtype=dtype,
    )


#: the VAE classes a model folder may hold -> the config key whose length gives the encoder's downsampling
VAE_DOWNSAMPLING_KEY = {"AutoencoderKL": "block_out_channels", "AutoencoderDC": "encoder_block_out_channels"}


def vae_key(cls_name: str) -> str:
    """The downsampling config key of a supported VAE class; a clear refusal for any other class."""
    key = VAE_DOWNSAMPLING_KEY.get(cls_name)
    if key is None:
        raise ModelError(f"unsupported VAE class {cls_name!r} ({' or '.join(VAE_DOWNSAMPLING_KEY)})")
    return key


def vae_spec(cls_name: str, config: dict) -> tuple[dict, int]:
    """One reading of a VAE config, with diffusers' defaults filled in (a loaded VAE's ``config``, or one
    built on the meta device): the bundle's encoder spec and the latent downsampling factor. The export
    and the dry run both read a folder's VAE through this."""
    key = vae_key(cls_name)
    channels = config.get(key)
    if not isinstance(channels, list | tuple) or not channels:
        raise ModelError(
            f"the {cls_name} config has no {key} list; the model folder's vae/config.json is damaged"
        )
    spec = {
        "class": cls_name,
        "config": {k: v for k, v in config.items() if not k.startswith("_")},
        "scaling_factor": config.get("scaling_factor", 1.0),
        "shift_factor": config.get("shift_factor"),
    }
    return spec, 2 ** (len(channels) - 1)


def _read_config(path: Path) -> dict:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}: {e}; the model folder is damaged") from e
    if not isinstance(cfg, dict):
        raise ModelError(f"{path} is not a JSON object; the model folder is damaged")
    return cfg


def _from_pretrained(cls, folder: Path, dtype):
    from diffusers.utils import logging as dlogging

    if not any(folder.glob("*.safetensors")):
        raise ModelError(
            f"no weights (*.safetensors) in {folder}; save the model with save_pretrained "
            "(safe_serialization) first"
        )
    level = dlogging.get_verbosity()
    dlogging.set_verbosity(dlogging.CRITICAL)  # our one-line error replaces diffusers' log lines
    try:
        return cls.from_pretrained(folder, torch_dtype=dtype, local_files_only=True).eval()
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelError(f"cannot load {cls.__name__} from {folder}: {msg}") from e
    finally:
        dlogging.set_verbosity(level)


def _folder_prompt_encoder(root: Path, fam: str, dtype):
    """Prompt embeddings from the folder's own text encoders, or a prompt_embeds.safetensors file."""

    def encode(prompt: str) -> dict:
        pre = root / "prompt_embeds.safetensors"
        if pre.is_file():
            from safetensors.torch import load_file

            return load_file(pre)
        if not (root / "text_encoder").is_dir():
            raise ModelError(
                f"{str(root)!r} has no text_encoder/ and no prompt_embeds.safetensors to embed the prompt"
            )
        import importlib

        import diffusers

        adapter = importlib.import_module(f"blockskip.export.families.{fam}")
        pipe = getattr(diffusers, adapter.PIPELINE).from_pretrained(
            root, transformer=None, vae=None, torch_dtype=dtype
        )
        with torch.no_grad():
            return adapter.encode_prompt(pipe, prompt)

    return encode
