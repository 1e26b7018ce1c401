"""``blockskip-select``: choose which blocks to skip by masking cross-attention (the paper's procedure).

For a skip ratio r over L blocks (k = round(r L) skipped), every split n + m = k is scored: image-query
-> text-key attention is masked in the first n and the last m blocks, samples are drawn with fixed
seeds and prompts, and the score is the mean ``1 - cos`` between the image features of the masked and
the unmasked samples. The split whose images move least (argmin) is chosen: those blocks matter least
for following the prompt, so skipping them costs the least. The result is a table, stored as data, that
the plan search reads (``export/selection/<model>.json``).

Masking per family: FLUX joint attention runs over ``[text, image]`` tokens (double and single
blocks): image rows get a mask over the text columns. SANA's image -> text path is its cross-attention
(``attn2``): masking all its text keys removes that branch. SD3's joint attention processor takes no
mask; SD3 is not supported yet.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

import torch

from blockskip.runtime.cli_util import run_cli
from blockskip.runtime.errors import BlockSkipError, PlanError

SELECTION_DIR = Path(__file__).parent / "selection"
DEFAULT_PROMPTS = ("a red circle on a white background", "a photo of a cup of coffee",
                   "a yellow star in the middle on a purple background", "a black and white photo of a face")
DEFAULT_RATIOS = (0.3, 0.4, 0.5)


class _TextMaskedJoint:
    """Wraps a FLUX attention processor: image queries may not attend to the ``n_text`` text keys."""

    def __init__(self, inner, n_text: int):
        self.inner, self.n_text = inner, n_text

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kw):
        total = hidden_states.shape[1] + (encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0)
        keep = torch.ones(total, total, dtype=torch.bool, device=hidden_states.device)
        keep[self.n_text :, : self.n_text] = False
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask=keep[None, None],
                          image_rotary_emb=image_rotary_emb, **kw)


class _NoCrossAttention:
    """SANA cross-attention with every text key masked: the branch contributes nothing."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        return torch.zeros_like(hidden_states)


@contextlib.contextmanager
def text_masked(family, model, blocks: list[int], n_text: int):
    """Mask image -> text attention in ``blocks`` of the full model for the duration."""
    if family.name == "sd3":
        raise BlockSkipError("blockskip-select does not support SD3/3.5 yet (its joint attention takes no mask)")
    paths = family.block_paths()
    swapped = []
    try:
        for i in blocks:
            block = model.get_submodule(paths[i])
            attn = block.attn if family.name == "flux" else block.attn2
            old = attn.processor
            attn.processor = _TextMaskedJoint(old, n_text) if family.name == "flux" else _NoCrossAttention()
            swapped.append((attn, old))
        yield model
    finally:
        for attn, old in swapped:
            attn.processor = old


def splits_for(num_blocks: int, ratio: float) -> list[tuple[int, int]]:
    k = round(ratio * num_blocks)
    if not 0 < k < num_blocks:
        raise PlanError(f"skip ratio {ratio} skips {k} of {num_blocks} blocks; choose a ratio in (0, 1)")
    return [(n, k - n) for n in range(k + 1)]


def select(lm, *, ratios=DEFAULT_RATIOS, prompts=DEFAULT_PROMPTS, seeds=(0, 1), steps: int = 20,
           features: str = "effnet", size: int | None = None, log=lambda msg: None) -> dict:
    """Score every split of every ratio; return the selection table (JSON-able)."""
    from blockskip.export.features import image_features
    from blockskip.export.sampling import decode, sample_latents, sampling_defaults

    fam, model = lm.family, lm.transformer
    how = sampling_defaults(lm)
    uncond = lm.encode_prompt("") if how["cfg"] != 1.0 else None
    L = fam.num_blocks
    size = size or 64
    f = lm.vae_factor
    if size % lm.granularity:
        raise PlanError(f"--size {size} must be a multiple of the model's granularity {lm.granularity}")
    c = lm.latent_channels
    texts = [lm.encode_prompt(p) for p in prompts]
    n_text = texts[0]["prompt_embeds"].shape[1]

    def feats(blocks: list[int]) -> torch.Tensor:
        with text_masked(fam, model, blocks, n_text):
            lat = torch.cat([sample_latents(fam, model, t, latent_side=size // f, channels=c, seeds=list(seeds),
                                            steps=steps, uncond=uncond, **how) for t in texts])
        return image_features(decode(lm.encoder, lat), features)

    ref = feats([])
    table: dict = {"model": lm.name, "family": fam.name, "num_blocks": L, "features": features,
                   "metric": "mean 1 - cos(features(masked sample), features(unmasked sample))",
                   "prompts": list(prompts), "seeds": list(seeds), "steps": steps, "size": size, **how,
                   "ratios": {}}
    for r in ratios:
        scores = {}
        for n, m in splits_for(L, r):
            blocks = list(range(n)) + list(range(L - m, L))
            got = feats(blocks)
            score = float((1 - torch.nn.functional.cosine_similarity(got, ref, dim=1)).mean())
            scores[f"{n},{m}"] = score
            log(f"ratio {r}: n={n} m={m}  1-cos {score:.3e}")
        best = min(scores, key=lambda s: (scores[s], s))
        n, m = (int(x) for x in best.split(","))
        table["ratios"][str(r)] = {"front": n, "back": m, "scores": scores}
    return table


def split_table(table: dict) -> dict:
    """The plan search's view of a selection table: ratio -> (n, m)."""
    return {r: (v["front"], v["back"]) for r, v in table.get("ratios", {}).items()}


def load_table(model_name: str, num_blocks: int) -> dict | None:
    """The committed selection table for a model, if there is one for this block count."""
    path = SELECTION_DIR / f"{model_name}.json"
    if not path.is_file():
        return None
    table = json.loads(path.read_text())
    if table.get("num_blocks") != num_blocks:
        return None
    return table


def write_table(table: dict, path: Path) -> None:
    from blockskip.runtime.files import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(table, indent=1) + "\n"))


def format_table(table: dict) -> str:
    lines = [f"selection for {table['model']} ({table['family']}, {table['num_blocks']} blocks; "
             f"{table['features']} features, {len(table['prompts'])} prompts x {len(table['seeds'])} seeds)",
             "| ratio | skipped | chosen (n, m) | 1 - cos of every split n,m |", "|---|---|---|---|"]
    for r, v in table["ratios"].items():
        k = v["front"] + v["back"]
        scores = ", ".join(f"{s}: {x:.2e}" for s, x in v["scores"].items())
        lines.append(f"| {r} | {k} | ({v['front']}, {v['back']}) | {scores} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="blockskip-select",
        description="Choose the blocks to skip for each skip ratio by masking image-to-text attention "
                    "and measuring how much the samples move.",
        epilog="example:\n  blockskip-select --model tiny --ratios 0.3,0.4,0.5 -o export/selection/tiny.json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny",
                   help="'tiny' (the built-in pretrained model), 'tiny-random' or a local diffusers folder")
    p.add_argument("--ratios", default=",".join(str(r) for r in DEFAULT_RATIOS), help="skip ratios, comma-separated")
    p.add_argument("--prompts", default=None, help="prompts separated by '|' (default: a fixed set of four)")
    p.add_argument("--seeds", default="0,1", help="sampling seeds, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="Euler sampling steps")
    p.add_argument("--size", type=int, default=64, help="sample size in px")
    p.add_argument("--features", choices=["effnet", "pixels"], default="effnet",
                   help="image features for the score (effnet: EfficientNet-Lite0, pip install 'dit-blockskip[eval]')")
    p.add_argument("-o", "--output", default=None,
                   help="write the table here (default: print only; the planner reads export/selection/<model>.json)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    a = p.parse_args(argv)

    def go():
        try:
            ratios = [float(x) for x in a.ratios.split(",") if x.strip()]
            seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
        except ValueError:
            raise PlanError("--ratios and --seeds are comma-separated numbers, e.g. --ratios 0.3,0.5") from None
        if not ratios or not seeds:
            raise PlanError("give at least one ratio and one seed")
        prompts = [s.strip() for s in a.prompts.split("|") if s.strip()] if a.prompts else list(DEFAULT_PROMPTS)
        from blockskip.export.families import load_model

        lm = load_model(a.model)
        table = select(lm, ratios=ratios, prompts=prompts, seeds=seeds, steps=a.steps, features=a.features,
                       size=a.size, log=lambda msg: print(msg, file=sys.stderr))
        print(format_table(table))
        if a.output:
            write_table(table, Path(a.output))
            print(f"table written to {a.output}")

    return run_cli(go, a.debug, "blockskip-select")


if __name__ == "__main__":
    sys.exit(main())
