"""A random-weight diffusers model folder at a real configuration (``export/configs/<model>.json``), written
shard by shard: the transformer is built on the meta device and each tensor is drawn from its own seeded
generator as its shard is filled, so no more than one shard (``--shard-gib``) is in memory at once.

The folder has what ``blockskip-export --model DIR`` reads: ``transformer/`` (config, shards and the
``diffusion_pytorch_model.safetensors.index.json`` weight map), ``vae/`` (the configured VAE, random,
saved whole: at most a few hundred MB) and ``prompt_embeds.safetensors`` (the configured prompt shapes).
It is cached: a folder with its ``.complete`` stamp for the same settings is reused.

    python -m bench.random_folder sana-1.6b /tmp/sana-1.6b
    python -m bench.random_folder flux-dev /tmp/flux-dev --dtype bfloat16   # 24 GB on disk
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from importlib import resources
from pathlib import Path

DTYPES = ("bfloat16", "float16", "float32")


def _config(model: str) -> dict:
    try:
        return json.loads((resources.files("blockskip.export") / "configs" / f"{model}.json").read_text())
    except FileNotFoundError:
        names = sorted(
            p.name[:-5]
            for p in resources.files("blockskip.export").joinpath("configs").iterdir()
            if p.name.endswith(".json")
        )
        raise SystemExit(f"unknown model {model!r}; choose from {', '.join(names)}") from None


def _values(name: str, shape, dtype, seed: int):
    """One tensor's seeded values: norms' scales 1, biases 0, other weights N(0, 0.02) (activations stay
    bounded through every block)."""
    import torch

    leaf = name.rsplit(".", 1)[-1]
    if len(shape) == 1 and "norm" in name and leaf == "weight":
        return torch.ones(shape, dtype=dtype)
    if leaf == "bias":
        return torch.zeros(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed ^ int(hashlib.sha256(name.encode()).hexdigest()[:15], 16))
    return (torch.randn(shape, generator=g) * 0.02).to(dtype)


def write_folder(
    model: str, root: Path, dtype: str = "bfloat16", seed: int = 0, shard_gib: float = 2.0, log=print
) -> Path:
    import diffusers
    import torch
    from safetensors.torch import save_file

    cfg = _config(model)
    stamp = {"model": model, "dtype": dtype, "seed": seed, "shard_gib": shard_gib, "config": cfg}
    done = root / ".complete"
    if done.is_file() and json.loads(done.read_text()) == stamp:
        log(f"{root}: cached")
        return root
    shutil.rmtree(root, ignore_errors=True)
    tr_cfg = {k: v for k, v in cfg["transformer"].items() if not k.startswith("_")}
    cls = getattr(diffusers, cfg["transformer"]["_class_name"])
    with torch.device("meta"):
        skeleton = cls.from_config(tr_cfg)
    tensors = list(skeleton.state_dict().items())
    tdt = getattr(torch, dtype)
    total = sum(t.numel() * (tdt.itemsize if t.is_floating_point() else t.element_size()) for _, t in tensors)
    limit = int(shard_gib * 2**30)
    shards: list[list[tuple[str, object]]] = [[]]
    size = 0
    for name, t in tensors:
        n = t.numel() * tdt.itemsize
        if shards[-1] and size + n > limit:
            shards.append([])
            size = 0
        shards[-1].append((name, t))
        size += n
    out = root / "transformer"
    out.mkdir(parents=True)
    skeleton.save_config(out)
    weight_map, written, t0 = {}, 0, time.time()
    for k, group in enumerate(shards):
        fname = f"diffusion_pytorch_model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        data = {
            name: _values(name, tuple(t.shape), tdt if t.is_floating_point() else t.dtype, seed)
            for name, t in group
        }
        save_file(data, out / fname, metadata={"format": "pt"})
        written += sum(v.numel() * v.element_size() for v in data.values())
        del data
        weight_map.update({name: fname for name, _ in group})
        rate = written / max(time.time() - t0, 1e-6)
        log(
            f"transformer shard {k + 1}/{len(shards)}: {written / 2**30:.1f} of {total / 2**30:.1f} GiB, "
            f"ETA {(total - written) / rate:.0f} s"
        )
    (out / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": written}, "weight_map": weight_map}, indent=1)
    )
    vae_cfg = {k: v for k, v in cfg["vae"].items() if not k.startswith("_")}
    torch.manual_seed(seed)
    vae = getattr(diffusers, cfg["vae"].get("_class_name", "AutoencoderKL")).from_config(vae_cfg)
    vae.save_pretrained(root / "vae")
    del vae
    g = torch.Generator().manual_seed(seed)
    save_file(
        {k: torch.randn(*v, generator=g).to(tdt) for k, v in cfg["prompt"].items()},
        root / "prompt_embeds.safetensors",
    )
    done.write_text(json.dumps(stamp))
    log(f"{root}: {sum(p.numel() for _, p in tensors) / 1e9:.2f}B parameters in {len(shards)} shards")
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", help="a config in export/configs (flux-dev, sd35-medium, sana-1.6b, ...)")
    ap.add_argument("folder")
    ap.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-gib", type=float, default=2.0)
    a = ap.parse_args(argv)
    write_folder(a.model, Path(a.folder), a.dtype, a.seed, a.shard_gib)
    return 0


if __name__ == "__main__":
    sys.exit(main())
