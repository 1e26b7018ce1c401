"""The export's own peak memory: a model folder exported with the transformer loaded whole against the
streaming export (the transformer read from its shards one block at a time), same plan, same bundle.

Writes the 315M-parameter FLUX-like model of ``bench.memory_accuracy`` (seeded random weights) as a
diffusers folder with its transformer in 200 MB shards, a small AutoencoderKL (8x downsampling) and
prompt embeddings, then exports a block-streamed int8 bundle (BlockSkip 50% at 256 px crops of 512 px
photos) twice, each in its own process, and prints each process's peak RSS (VmHWM) and its RSS before
the export started (the interpreter and libraries).

    python -m bench.export_memory              # ~1 min on 2 cores
    python -m bench.export_memory --format pte # with the ExecuTorch programs (slower)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RUN = """
import json, sys, torch
from blockskip.export.bundle_writer import export_bundle
from blockskip.export.families import load_model
from blockskip.export.memory.search import split_for
from blockskip.runtime.memory import peak_rss_mib, rss_bytes
from blockskip.runtime.plan import Plan
from blockskip.runtime.profiles import load_profile

folder, mode, fmt, out = sys.argv[1:5]
start = rss_bytes() / 2**20
lm = load_model(folder, torch.float32, stream=mode == "streamed")
n, m = split_for(lm.family.num_blocks, 0.5)
plan = Plan(front_skip=n, back_skip=m, s_min=256, s_max=512, num_samples=2, steps=2, lora_rank=16,
            span="streamed", storage="int8")
export_bundle(lm, plan, load_profile("desktop-cpu"), "a photo of sks", out, force=True, formats=fmt.split(","))
print(json.dumps({"start": start, "peak": peak_rss_mib()}))
"""


def write_folder(root: Path) -> int:
    import torch
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from safetensors.torch import save_file

    from bench.memory_accuracy import model_config

    torch.manual_seed(0)
    model = FluxTransformer2DModel(**model_config(small=False))
    params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(root / "transformer", max_shard_size="200MB")
    del model
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 32, 32, 32),
        latent_channels=16,
        norm_num_groups=8,
        layers_per_block=1,
    )
    vae.save_pretrained(root / "vae")
    save_file(
        {"prompt_embeds": torch.randn(1, 512, 768), "pooled": torch.randn(1, 256)},
        root / "prompt_embeds.safetensors",
    )
    return params


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="torch", help="bundle formats (default torch)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "flux-like"
        params = write_folder(root)
        size = sum(p.stat().st_size for p in (root / "transformer").glob("*.safetensors"))
        print(
            f"model folder: {params / 1e6:.0f}M parameters, transformer {size / 2**30:.2f} GiB in "
            f"{len(list((root / 'transformer').glob('*.safetensors')))} shards",
            flush=True,
        )
        print("| export | RSS before (MiB) | peak RSS (MiB) | peak above before (MiB) |")
        print("|---|---|---|---|")
        bundles = {}
        for mode in ("loaded", "streamed"):
            bundles[mode] = Path(tmp) / f"bundle-{mode}"
            r = subprocess.run(
                [sys.executable, "-c", RUN, str(root), mode, a.format, str(bundles[mode])],
                capture_output=True,
                text=True,
            )
            if r.returncode != 0:
                raise RuntimeError(f"{mode} export failed:\n{r.stderr[-3000:]}")
            m = json.loads(r.stdout.strip().splitlines()[-1])
            print(
                f"| {mode} | {m['start']:.0f} | {m['peak']:.0f} | {m['peak'] - m['start']:.0f} |", flush=True
            )
        same = all(
            (bundles["loaded"] / p.relative_to(bundles["streamed"])).read_bytes() == p.read_bytes()
            for p in bundles["streamed"].rglob("*")
            if p.is_file()
        )
        print(f"same bundle, byte for byte: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
