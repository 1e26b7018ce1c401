"""Pretrain the built-in tiny text-to-image DiT on CPU, offline, reproducibly from a seed.

    python -m tools.pretrain_tiny --out export/weights/tiny-flux.safetensors --minutes 55 --seed 0 --threads 1

The model is a diffusers ``FluxTransformer2DModel`` of a few million parameters (``TINY_CONFIG``) that
denoises ``PatchDCTAutoencoder`` latents (16 channels, 1/4 of the image side; FLUX's 2 x 2 packing
makes 64-wide tokens) conditioned on ``WordTextEncoder`` captions. It learns from ``TinyCaptionData``:
procedural shape scenes and crops of photos that ship with scikit-image / scikit-learn.

Training is rectified flow as in the runtime (``torch_sample.make_sample``): x_t = (1 - s) x0 + s eps,
the model predicts eps - x0 at timestep s (diffusers scales it by 1000), with s drawn logit-normal (or
uniform) and mapped through ``shift_sigma``. 10 % of captions are dropped (empty caption) so samples
can use classifier-free guidance. Image-token positions follow the runtime's "crop" convention: half
of the batches get the RoPE positions of a random crop of a frame twice the image side (the default
s_min = 64 / s_max = 128 plan), the rest the native grid. AdamW, linear warmup then cosine decay, an
EMA of the weights (what is saved).

Outputs beside ``--out``: the EMA weights as safetensors (float32, or float16 when float32 would exceed
20 MB) with metadata (config JSON, text encoder and latent mapping, seed, steps, command, final loss),
``<stem>.loss.json`` (loss curve) and ``<stem>.samples.png`` (a sample grid for ``GRID_CAPTIONS``).
With ``--minutes`` the step count is fixed after timing the first steps and recorded; passing it back as
``--steps`` repeats the run exactly (same seed, same thread count).

Speed on a 2-core x86 machine (AVX-512), batch 16, 64 px: about 0.55 s/step with one thread, 0.33 s/step
with two on an idle machine, but several times slower with two threads when another job holds a core;
hence ``--threads 1`` on a shared machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import shlex
import sys
import time
from pathlib import Path

import numpy as np
import torch

from blockskip.export.tiny import LATENT, TEXT, TINY_CONFIG
from blockskip.runtime.backends.torch_families.base import (
    CropGeometry,
    crop_coords,
    pixel_shuffle_tokens,
    pixel_unshuffle_tokens,
)
from blockskip.runtime.backends.torch_families.latent import PatchDCTAutoencoder
from blockskip.runtime.schedule import shift_sigma
from tools.tiny_data import GRID_CAPTIONS, TinyCaptionData, WordTextEncoder

MAX_BYTES = 20 * 2**20
CAPTION_DROP = 0.1
VAL_SEED = 2**31 - 7  # the fixed validation batch comes from this data seed


def build_model(seed: int, config: dict = TINY_CONFIG):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**config)


def positions(rng: np.random.Generator, tokens: int, crop_prob: float) -> torch.Tensor:
    """Image ids [tokens^2, 3]: a random crop of a frame twice as large (prob crop_prob), else the grid."""
    low = 2 * tokens  # latent px
    if rng.random() < crop_prob:
        full = 2 * low
        side = 2 * int(rng.integers(tokens, low + 1))  # latent px, even: 2 x 2 packing
        top, left = (2 * int(rng.integers(0, (full - side) // 2 + 1)) for _ in range(2))
        geom = CropGeometry(full=full, side=side, top=top, left=left, low=low)
        rows, cols = crop_coords(geom, 2, "crop")
    else:
        rows = cols = torch.arange(tokens, dtype=torch.float64)
    ids = torch.zeros(tokens, tokens, 3, dtype=torch.float64)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


def sample_sigmas(gen: torch.Generator, n: int, kind: str, shift: float) -> torch.Tensor:
    if kind == "logit-normal":
        u = torch.sigmoid(torch.randn(n, generator=gen))
    else:
        u = torch.rand(n, generator=gen)
    return torch.tensor([shift_sigma(float(v), shift) for v in u.clamp(1e-4, 1.0)])


def predict(model, x_t, sigma, text, img_ids):
    """Latents [B,C,h,w] at noise sigma [B] -> predicted velocity eps - x0, same shape."""
    b, _, h, w = x_t.shape
    out = model(
        hidden_states=pixel_unshuffle_tokens(x_t, 2, channels_last=False),
        encoder_hidden_states=text["prompt_embeds"],
        pooled_projections=text["pooled"],
        timestep=sigma,
        img_ids=img_ids,
        txt_ids=img_ids.new_zeros(text["prompt_embeds"].shape[1], 3),
        return_dict=False,
    )[0]
    return pixel_shuffle_tokens(out, h, w, 2, channels_last=False)


@torch.no_grad()
def sample(
    model,
    text_encoder,
    latent,
    captions: list[str],
    seeds: list[int],
    size: int = 64,
    steps: int = 25,
    cfg: float = 2.0,
    shift: float = 1.0,
) -> torch.Tensor:
    """Euler flow-matching sampler (sigma 1 -> 0) with classifier-free guidance; images [B,3,S,S] in [-1,1]."""
    dev = next(model.parameters()).device
    lat = size // latent.factor
    x = torch.stack(
        [
            torch.randn(latent.latent_channels, lat, lat, generator=torch.Generator().manual_seed(s))
            for s in seeds
        ]
    ).to(dev)
    cond = _to(text_encoder.encode(captions), dev)
    uncond = _to(text_encoder.encode([""] * len(captions)), dev)
    ids = positions(np.random.default_rng(0), lat // 2, 0.0).to(dev)
    sig = [shift_sigma(1 - i / steps, shift) for i in range(steps)] + [0.0]
    for s, s_next in zip(sig[:-1], sig[1:]):
        t = torch.full((len(seeds),), s, device=dev)
        v = predict(model, x, t, cond, ids)
        if cfg != 1.0:
            v_uncond = predict(model, x, t, uncond, ids)
            v = v_uncond + cfg * (v - v_uncond)
        x = x + (s_next - s) * v
    return latent.decode(x.cpu()).clamp(-1, 1)


def _to(text: dict, dev) -> dict:
    return {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in text.items()}


def save_grid(
    images: torch.Tensor, captions: list[str], per_caption: int, path: Path, cols: int = 4, zoom: int = 2
) -> None:
    """Samples grouped per caption (per_caption side by side), captions printed under each group."""
    from PIL import Image, ImageDraw

    n, _, s, _ = images.shape
    arr = ((images + 1) * 127.5).round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()
    cell_w, img_h, text_h = per_caption * s * zoom, s * zoom, 28
    rows = math.ceil(len(captions) / cols)
    grid = Image.new("RGB", (cols * cell_w, rows * (img_h + text_h)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    chars = max(8, cell_w // 6)
    for k, cap in enumerate(captions):
        x0, y0 = (k % cols) * cell_w, (k // cols) * (img_h + text_h)
        for j in range(per_caption):
            im = Image.fromarray(arr[k * per_caption + j]).resize((s * zoom, s * zoom), Image.NEAREST)
            grid.paste(im, (x0 + j * s * zoom, y0))
        words, lines, line = cap.split(), [], ""
        for w in words:
            if len(line) + len(w) + 1 > chars:
                lines.append(line)
                line = w
            else:
                line = f"{line} {w}".strip()
        lines.append(line)
        for i, ln in enumerate(lines[:2]):
            draw.text((x0 + 3, y0 + img_h + 2 + 12 * i), ln, fill=(0, 0, 0))
    grid.save(path)


def lr_at(step: int, total: int, lr: float, warmup: int, final: float = 0.1) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * p)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m tools.pretrain_tiny",
        description="Pretrain the built-in tiny FLUX-architecture text-to-image model on bundled data (CPU).",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("export/weights/tiny-flux.safetensors"),
        help="weights file; <stem>.loss.json and <stem>.samples.png are written beside it",
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="time budget: the step count is set from the first steps' speed (default 45 without --steps)",
    )
    p.add_argument(
        "--steps", type=int, default=None, help="optimizer steps (exact; overrides the --minutes estimate)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--batch",
        type=int,
        default=16,
        help="images per step (16 learned fastest per CPU minute in trials; 32 and 64 were slower)",
    )
    p.add_argument("--size", type=int, default=64, help="image side in px (multiple of 8)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument(
        "--ema", type=float, default=0.999, help="EMA decay (ramped up from 0 over the first steps)"
    )
    p.add_argument("--timesteps", choices=["logit-normal", "uniform"], default="logit-normal")
    p.add_argument("--shift", type=float, default=1.0, help="timestep shift (as the runtime's --shift)")
    p.add_argument(
        "--crop-positions",
        type=float,
        default=0.5,
        help="fraction of batches with the RoPE positions of a crop of a 2x frame",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads (default: all cores; use 1 when other jobs share the cores: "
        "torch's threads stall badly when a core is busy)",
    )
    p.add_argument(
        "--device",
        default="cpu",
        help="torch device for the model (the recorded runs use cpu; data and noise are always made on "
        "the CPU, so another device changes only the arithmetic)",
    )
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--val-every", type=int, default=100)
    p.add_argument(
        "--sample-every",
        type=int,
        default=0,
        help="also write <stem>.samples-<step>.png every N steps (0: only the final grid)",
    )
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale of the sample grid")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.minutes is None and args.steps is None:
        args.minutes = 45.0
    command = "python -m tools.pretrain_tiny " + shlex.join(sys.argv[1:] if argv is None else argv)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    torch.manual_seed(args.seed)
    from diffusers.utils import logging as dlogging

    dlogging.set_verbosity_error()

    dev = torch.device(args.device)
    model = build_model(args.seed).to(dev).train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    n_params = sum(p.numel() for p in model.parameters())
    latent = PatchDCTAutoencoder(**LATENT).eval()
    text_encoder = WordTextEncoder(**TEXT)
    data = TinyCaptionData(args.size, args.seed)
    tokens = args.size // latent.factor // 2
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.99),
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.with_suffix("")
    print(
        f"tiny DiT: {n_params / 1e6:.2f} M parameters, {args.size} px images ({tokens}x{tokens} tokens), "
        f"batch {args.batch}, {torch.get_num_threads()} threads",
        flush=True,
    )

    # fixed validation batch: fixed images, captions, sigmas and noise
    vx, vcaps = TinyCaptionData(args.size, VAL_SEED).batch(0, 64)
    with torch.no_grad():
        v_x0 = latent.encode(vx)
    vgen = torch.Generator().manual_seed(VAL_SEED)
    v_eps = torch.randn(v_x0.shape, generator=vgen)
    v_sigma = torch.linspace(0.02, 0.98, len(vcaps))
    v_x0, v_eps = v_x0.to(dev), v_eps.to(dev)
    v_sigma = v_sigma.to(dev)
    v_text = _to(text_encoder.encode(vcaps), dev)
    v_ids = positions(np.random.default_rng(0), tokens, 0.0).to(dev)

    def val_loss(m) -> float:
        m.eval()
        with torch.no_grad():
            s = v_sigma[:, None, None, None]
            pred = predict(m, (1 - s) * v_x0 + s * v_eps, v_sigma, v_text, v_ids)
            loss = ((pred - (v_eps - v_x0)) ** 2).mean().item()
        m.train()
        return loss

    total = args.steps
    limit_s = args.minutes * 60 if args.minutes else float("inf")
    calib = 40
    curve = {"step": [], "train_loss": [], "lr": [], "elapsed_s": [], "val_step": [], "val_loss": []}
    window: list[float] = []
    start = time.time()
    durations: list[float] = []
    step = 0
    stopped_early = False
    while total is None or step < total:
        t_step = time.time()
        if total is None and step == calib:  # fix the step count from the measured speed
            per_step = float(np.median(durations[2:]))  # the median shrugs off other jobs' bursts
            total = max(calib + 1, int((limit_s - (time.time() - start)) / per_step * 0.95) + calib)
            print(f"{per_step:.2f} s/step -> {total} steps in {args.minutes:g} min", flush=True)
        if time.time() - start > limit_s * (1.1 if args.steps is None else 1.0):
            stopped_early = True
            print(f"time budget reached at step {step}", flush=True)
            break
        lr = lr_at(step, total or 10**9, args.lr, args.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        rng = np.random.default_rng([args.seed, step, 1])
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        x, caps = data.batch(step, args.batch)
        caps = ["" if rng.random() < CAPTION_DROP else c for c in caps]
        with torch.no_grad():
            x0 = latent.encode(x)
        eps = torch.randn(x0.shape, generator=gen).to(dev)
        sigma = sample_sigmas(gen, args.batch, args.timesteps, args.shift).to(dev)
        x0 = x0.to(dev)
        s = sigma[:, None, None, None]
        pred = predict(
            model,
            (1 - s) * x0 + s * eps,
            sigma,
            _to(text_encoder.encode(caps), dev),
            positions(rng, tokens, args.crop_positions).to(dev),
        )
        loss = ((pred - (eps - x0)) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        d = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - d)
        window.append(loss.item())
        durations.append(time.time() - t_step)
        step += 1
        if step % args.log_every == 0 or step == total:
            el = time.time() - start
            curve["step"].append(step)
            curve["train_loss"].append(float(np.mean(window)))
            curve["lr"].append(lr)
            curve["elapsed_s"].append(round(el, 1))
            print(
                f"step {step}/{total or '?'}  loss {np.mean(window):.4f}  lr {lr:.2e}  "
                f"{el / step:.2f} s/step  {el / 60:.1f} min",
                flush=True,
            )
            window = []
        if step % args.val_every == 0 or step == total:
            vl = val_loss(model)
            curve["val_step"].append(step)
            curve["val_loss"].append(vl)
            print(f"  val loss {vl:.4f}", flush=True)
        if args.sample_every and step % args.sample_every == 0:
            _write_samples(ema, text_encoder, latent, args, Path(f"{stem}.samples-{step}.png"))

    elapsed = time.time() - start
    final_val = val_loss(ema)
    print(
        f"done: {step} steps in {elapsed / 60:.1f} min ({step / elapsed:.3f} steps/s); EMA val loss {final_val:.4f}",
        flush=True,
    )
    _write_samples(ema, text_encoder, latent, args, Path(f"{stem}.samples.png"))

    state = {k: v.detach().cpu().contiguous() for k, v in ema.state_dict().items()}
    dtype = torch.float32 if n_params * 4 <= MAX_BYTES else torch.float16
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    meta = {
        "format": "diffusers FluxTransformer2DModel state dict (EMA weights)",
        "config": json.dumps(dict(TINY_CONFIG, axes_dims_rope=list(TINY_CONFIG["axes_dims_rope"]))),
        "text_encoder": json.dumps({"class": "WordTextEncoder", **TEXT}),
        "latent": json.dumps({"class": "PatchDCTAutoencoder", "config": LATENT}),
        "image_size": str(args.size),
        "seed": str(args.seed),
        "steps": str(step),
        "planned_steps": str(total),
        "stopped_early": str(stopped_early).lower(),
        "batch": str(args.batch),
        "threads": str(torch.get_num_threads()),
        "command": command,
        "reproduce": _reproduce(command, total),
        "final_train_loss": f"{curve['train_loss'][-1]:.5f}" if curve["train_loss"] else "nan",
        "final_val_loss_ema": f"{final_val:.5f}",
        "params": str(n_params),
        "minutes": f"{elapsed / 60:.1f}",
        "dtype": str(dtype).removeprefix("torch."),
    }
    from safetensors.torch import save_file

    save_file(state, str(out), metadata=meta)
    curve.update(
        {k: v for k, v in meta.items() if k not in ("config", "text_encoder", "latent")},
        config=TINY_CONFIG,
        steps_per_s=step / elapsed,
        grid_captions=list(GRID_CAPTIONS),
    )
    Path(f"{stem}.loss.json").write_text(json.dumps(curve, indent=1))
    print(
        f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB, {meta['dtype']}), {stem}.loss.json, "
        f"{stem}.samples.png",
        flush=True,
    )
    return 0


def _reproduce(command: str, total: int | None) -> str:
    words = shlex.split(command)
    if "--steps" in words:
        return command
    keep, skip = [], False
    for w in words:
        if skip:
            skip = False
            continue
        if w == "--minutes":
            skip = True
            continue
        if w.startswith("--minutes="):
            continue
        keep.append(w)
    return shlex.join(keep + ["--steps", str(total)])


def _write_samples(model, text_encoder, latent, args, path: Path) -> None:
    per = 2
    caps = [c for c in GRID_CAPTIONS for _ in range(per)]
    seeds = [1000 + i for i in range(len(caps))]
    imgs = sample(
        model,
        text_encoder,
        latent,
        caps,
        seeds,
        size=args.size,
        steps=args.sample_steps,
        cfg=args.cfg,
        shift=args.shift,
    )
    save_grid(imgs, list(GRID_CAPTIONS), per, path)


if __name__ == "__main__":
    sys.exit(main())
