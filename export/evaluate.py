"""``blockskip-eval``: how far a LoRA moved the model toward the subject, before vs after.

Metrics (each computed without and with the LoRA, same seeds and prompts):

* **EffNet-I**: mean cosine similarity between EfficientNet-Lite0 features of generated samples and of
  the held-out subject views (higher: samples look more like the subject). An ImageNet-classifier
  feature score in the spirit of the paper's DINO / CLIP-I, whose weights are not obtainable offline.
* **held-out loss**: the flow-matching loss of the full model on the held-out subject views at fixed
  noise levels and noise (lower: the model explains unseen views of the subject better). Needs no
  extra package.
* **prompt sensitivity**: mean ``1 - cos`` between features of samples for the training prompt and for
  contrast prompts, same seeds. A LoRA that overfits stops listening to the prompt (language drift), so
  this falls; a proxy for prompt alignment, since no text-image model is available offline.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from blockskip.runtime.cli_util import run_cli
from blockskip.runtime.errors import BlockSkipError

CONTRAST_PROMPTS = ("a red circle on a blue background", "two yellow squares")
LOSS_SIGMAS = (0.2, 0.4, 0.6, 0.8)


def heldout_loss(lm, views: torch.Tensor, text: dict, seeds=(0, 1), frame: int | None = None) -> float:
    """Mean flow-matching MSE of the full model on ``views`` [N,3,S,S] in [-1,1] (positions: the whole
    frame, as ``sampling_defaults``)."""
    from blockskip.export.sampling import sampling_defaults, velocity
    from blockskip.runtime.backends.torch_families.base import CropGeometry
    from blockskip.runtime.backends.torch_families.latent import encode_images

    fam, model = lm.family, lm.transformer
    frame = frame or sampling_defaults(lm)["frame"]
    with torch.no_grad():
        x0 = encode_images(lm.encoder, lm.encoder_spec, views.float())
        prepared = fam.prepare_text(model, text)
        side = x0.shape[-1]
        geom = CropGeometry(full=side * frame, side=side * frame, top=0, left=0, low=side)
        losses = []
        for i in range(len(x0)):
            for s in LOSS_SIGMAS:
                for seed in seeds:
                    g = torch.Generator().manual_seed(1000 * i + seed)
                    eps = torch.randn(x0[i : i + 1].shape, generator=g)
                    xt = (1 - s) * x0[i : i + 1] + s * eps
                    v = velocity(fam, model, xt, s, prepared, geom, guidance=3.5)
                    losses.append(float(torch.mean((v - (eps - x0[i : i + 1])) ** 2)))
    return sum(losses) / len(losses)


def evaluate(
    lm,
    lora: str | None,
    views: torch.Tensor,
    prompt: str,
    *,
    seeds=(0, 1, 2, 3),
    steps: int = 20,
    size: int = 64,
    features: str = "effnet",
    contrast=CONTRAST_PROMPTS,
    log=lambda m: None,
):
    """Scores and sample images without (``before``) and with (``after``) the LoRA."""
    from blockskip.export.features import image_features
    from blockskip.export.sampling import decode, lora_loaded, sample_latents, sampling_defaults

    fam, model = lm.family, lm.transformer
    how = sampling_defaults(lm)
    uncond = lm.encode_prompt("") if how["cfg"] != 1.0 else None
    c = lm.latent_channels
    side = size // lm.vae_factor
    ref = image_features(views, features)
    text = lm.encode_prompt(prompt)
    others = [lm.encode_prompt(p) for p in contrast]
    out: dict = {
        "prompt": prompt,
        "contrast_prompts": list(contrast),
        "seeds": list(seeds),
        "steps": steps,
        "size": size,
        "features": features,
        "views": len(views),
        **how,
    }
    images = {}
    for tag, path in (("before", None), ("after", lora)):
        with lora_loaded(model, path):
            log(f"{tag}: sampling {len(seeds)} seeds")
            imgs = decode(
                lm.encoder,
                sample_latents(
                    fam,
                    model,
                    text,
                    latent_side=side,
                    channels=c,
                    seeds=list(seeds),
                    steps=steps,
                    uncond=uncond,
                    **how,
                ),
            )
            f = image_features(imgs, features)
            sens = []
            for o in others:
                oi = decode(
                    lm.encoder,
                    sample_latents(
                        fam,
                        model,
                        o,
                        latent_side=side,
                        channels=c,
                        seeds=list(seeds),
                        steps=steps,
                        uncond=uncond,
                        **how,
                    ),
                )
                sens.append(
                    float((1 - torch.nn.functional.cosine_similarity(f, image_features(oi, features))).mean())
                )
            log(f"{tag}: held-out loss")
            out[tag] = {
                "effnet_i" if features == "effnet" else f"{features}_i": float(
                    torch.nn.functional.normalize(f, dim=1)
                    .mm(torch.nn.functional.normalize(ref, dim=1).T)
                    .mean()
                ),
                "heldout_loss": heldout_loss(lm, views, text),
                "prompt_sensitivity": sum(sens) / len(sens),
            }
            images[tag] = imgs
    return out, images


def load_views(folder, size: int) -> torch.Tensor:
    from blockskip.runtime.images import load_images

    _, arr = load_images(folder, size)
    return torch.from_numpy(arr)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="blockskip-eval",
        description="Score a LoRA against held-out views of its subject (EffNet-I, held-out flow-matching "
        "loss, prompt sensitivity), before vs after, and write a sample grid.",
        epilog="example:\n  blockskip-eval --model tiny --lora out/lora.safetensors --views demo/heldout "
        "--prompt 'a photo of sks cat' --grid out/grid.png --json out/eval.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (the built-in pretrained model), 'tiny-random' or a local diffusers folder",
    )
    p.add_argument("--lora", required=True, help="LoRA safetensors written by device-train")
    p.add_argument("--views", required=True, help="folder of held-out subject photos")
    p.add_argument("--prompt", required=True, help="the training prompt")
    p.add_argument("--seeds", default="0,1,2,3")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--size", type=int, default=64, help="sample size in px")
    p.add_argument("--features", choices=["effnet", "pixels"], default="effnet")
    p.add_argument("--grid", default=None, help="write a PNG: held-out views, samples before, samples after")
    p.add_argument("--json", default=None, help="write the scores here")
    p.add_argument("--debug", action="store_true")
    a = p.parse_args(argv)

    def go():
        from blockskip.export.families import load_model
        from blockskip.export.sampling import save_grid, to_uint8
        from blockskip.runtime.files import atomic_write

        if not Path(a.lora).is_file():
            raise BlockSkipError(f"LoRA file {a.lora!r} not found")
        seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
        lm = load_model(a.model)
        views = load_views(a.views, a.size)
        scores, images = evaluate(
            lm,
            a.lora,
            views,
            a.prompt,
            seeds=seeds,
            steps=a.steps,
            size=a.size,
            features=a.features,
            log=lambda m: print(m, file=sys.stderr),
        )
        key = next(k for k in scores["after"] if k.endswith("_i"))
        print("| metric | before | after |\n|---|---|---|")
        for k in (key, "heldout_loss", "prompt_sensitivity"):
            print(f"| {k} | {scores['before'][k]:.4f} | {scores['after'][k]:.4f} |")
        if a.grid:
            save_grid(
                [to_uint8(views[: len(seeds)]), to_uint8(images["before"]), to_uint8(images["after"])],
                a.grid,
                labels=["subject", "before", "after"],
            )
            print(f"grid written to {a.grid}")
        if a.json:
            atomic_write(Path(a.json), lambda tmp: Path(tmp).write_text(json.dumps(scores, indent=1)))

    return run_cli(go, a.debug, "blockskip-eval")


if __name__ == "__main__":
    sys.exit(main())
