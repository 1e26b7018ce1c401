"""``blockskip-select``: choose which blocks to skip by masking cross-attention (the paper's procedure).

For a skip ratio r over L blocks (k = round(r L) skipped), every split n + m = k is scored: image-query
-> text-key attention is masked in the first n and the last m blocks, samples are drawn with fixed
seeds and prompts, and the score is the mean ``1 - cos`` between the image features of the masked and
the unmasked samples. The split whose images move least (argmin) is chosen: those blocks matter least
for following the prompt, so skipping them costs the least. The result is a table, stored as data, that
the plan search reads (``export/selection/<model>.json``).

Masking per family: FLUX joint attention runs over ``[text, image]`` tokens (double and single
blocks): image rows get a mask over the text columns. SANA's image -> text path is its cross-attention
(``attn2``): masking all its text keys removes that branch. SD3/3.5 joint attention runs over
``[image, text]``; diffusers' processor takes no mask, so masked blocks get ``_TextMaskedSD3Joint``
(SD3.5's second attention is image-only and needs none).
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
DEFAULT_PROMPTS = (
    "a red circle on a white background",
    "a photo of a cup of coffee",
    "a yellow star in the middle on a purple background",
    "a black and white photo of a face",
)
DEFAULT_RATIOS = (0.3, 0.4, 0.5)  # the paper's; for a few blocks pick ratios that skip distinct counts


class _TextMaskedJoint:
    """Wraps a FLUX attention processor: image queries may not attend to the ``n_text`` text keys."""

    def __init__(self, inner, n_text: int):
        self.inner, self.n_text = inner, n_text

    def __call__(
        self,
        attn,
        hidden_states,
        encoder_hidden_states=None,
        attention_mask=None,
        image_rotary_emb=None,
        **kw,
    ):
        total = hidden_states.shape[1] + (
            encoder_hidden_states.shape[1] if encoder_hidden_states is not None else 0
        )
        keep = torch.ones(total, total, dtype=torch.bool, device=hidden_states.device)
        keep[self.n_text :, : self.n_text] = False
        return self.inner(
            attn,
            hidden_states,
            encoder_hidden_states,
            attention_mask=keep[None, None],
            image_rotary_emb=image_rotary_emb,
            **kw,
        )


class _TextMaskedSD3Joint:
    """SD3/3.5 joint attention (image tokens, then text tokens) in which image queries may not attend to
    the text keys; text queries still attend to everything. diffusers' ``JointAttnProcessor2_0`` takes
    no mask, so this is the same computation with one: per-stream q/k/v projections and qk-norms, one
    SDPA over the concatenation, split, per-stream output projections. ``mask=False`` is the unmasked
    computation (the tests hold it equal to diffusers')."""

    def __init__(self, mask: bool = True):
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kw):
        if encoder_hidden_states is None:
            raise BlockSkipError("SD3 joint attention without text: nothing to mask")
        b, n_img, _ = hidden_states.shape

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        def normed(norm, x):
            return norm(x) if norm is not None else x

        q = normed(attn.norm_q, heads(attn.to_q(hidden_states)))
        k = normed(attn.norm_k, heads(attn.to_k(hidden_states)))
        v = heads(attn.to_v(hidden_states))
        cq = normed(attn.norm_added_q, heads(attn.add_q_proj(encoder_hidden_states)))
        ck = normed(attn.norm_added_k, heads(attn.add_k_proj(encoder_hidden_states)))
        cv = heads(attn.add_v_proj(encoder_hidden_states))
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        total = q.shape[2]
        keep = None
        if self.mask:
            keep = torch.ones(total, total, dtype=torch.bool, device=q.device)
            keep[:n_img, n_img:] = False
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        out = out.transpose(1, 2).reshape(b, total, -1).to(q.dtype)
        img, txt = out[:, :n_img], out[:, n_img:]
        img = attn.to_out[1](attn.to_out[0](img))
        if not attn.context_pre_only:
            txt = attn.to_add_out(txt)
        return img, txt


class _NoCrossAttention:
    """SANA cross-attention with every text key masked: the branch contributes nothing."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
        return torch.zeros_like(hidden_states)


@contextlib.contextmanager
def text_masked(family, model, blocks: list[int], n_text: int):
    """Mask image -> text attention in ``blocks`` of the full model for the duration (FLUX and SD3/3.5:
    inside the joint attention; SANA: its cross-attention contributes nothing; SD3.5's second,
    image-only attention needs no mask)."""
    paths = family.block_paths()
    swapped = []
    try:
        for i in blocks:
            block = model.get_submodule(paths[i])
            attn = block.attn2 if family.name == "sana" else block.attn
            old = attn.processor
            if family.name == "flux":
                attn.processor = _TextMaskedJoint(old, n_text)
            elif family.name == "sd3":
                attn.processor = _TextMaskedSD3Joint()
            else:
                attn.processor = _NoCrossAttention()
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


def select(
    lm,
    *,
    ratios=DEFAULT_RATIOS,
    prompts=DEFAULT_PROMPTS,
    seeds=(0, 1),
    steps: int = 20,
    features: str = "effnet",
    size: int | None = None,
    log=lambda msg: None,
) -> dict:
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
            lat = torch.cat(
                [
                    sample_latents(
                        fam,
                        model,
                        t,
                        latent_side=size // f,
                        channels=c,
                        seeds=list(seeds),
                        steps=steps,
                        uncond=uncond,
                        **how,
                    )
                    for t in texts
                ]
            )
        return image_features(decode(lm.encoder, lat), features)

    ref = feats([])
    table: dict = {
        "model": lm.name,
        "family": fam.name,
        "num_blocks": L,
        "features": features,
        "metric": "mean 1 - cos(features(masked sample), features(unmasked sample))",
        "prompts": list(prompts),
        "seeds": list(seeds),
        "steps": steps,
        "size": size,
        **how,
        "ratios": {},
    }
    done: dict[int, str] = {}  # skipped-block count -> the ratio that scored it
    for r in ratios:
        k = round(r * L)
        if k in done:  # another ratio skipping as many blocks: the same splits, scored already
            table["ratios"][str(r)] = table["ratios"][done[k]]
            log(f"ratio {r}: skips {k} blocks like ratio {done[k]}; reusing its scores")
            continue
        done[k] = str(r)
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
    lines = [
        f"selection for {table['model']} ({table['family']}, {table['num_blocks']} blocks; "
        f"{table['features']} features, {len(table['prompts'])} prompts x {len(table['seeds'])} seeds)",
        "| ratio | skipped | chosen (n, m) | 1 - cos of every split n,m |",
        "|---|---|---|---|",
    ]
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
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        default="tiny",
        help="'tiny' (the built-in pretrained model), 'tiny-random' or a local diffusers folder",
    )
    p.add_argument(
        "--ratios", default=",".join(str(r) for r in DEFAULT_RATIOS), help="skip ratios, comma-separated"
    )
    p.add_argument("--prompts", default=None, help="prompts separated by '|' (default: a fixed set of four)")
    p.add_argument("--seeds", default="0,1", help="sampling seeds, comma-separated")
    p.add_argument("--steps", type=int, default=20, help="Euler sampling steps")
    p.add_argument("--size", type=int, default=64, help="sample size in px")
    p.add_argument(
        "--features",
        choices=["effnet", "pixels"],
        default="effnet",
        help="image features for the score (effnet: EfficientNet-Lite0, pip install 'dit-blockskip[eval]')",
    )
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="write the table here (default: print only; the planner reads export/selection/<model>.json)",
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    a = p.parse_args(argv)

    def go():
        try:
            ratios = [float(x) for x in a.ratios.split(",") if x.strip()]
            seeds = [int(x) for x in a.seeds.split(",") if x.strip()]
        except ValueError:
            raise PlanError(
                "--ratios and --seeds are comma-separated numbers, e.g. --ratios 0.3,0.5"
            ) from None
        if not ratios or not seeds:
            raise PlanError("give at least one ratio and one seed")
        prompts = (
            [s.strip() for s in a.prompts.split("|") if s.strip()] if a.prompts else list(DEFAULT_PROMPTS)
        )
        from blockskip.export.families import load_model

        lm = load_model(a.model)
        table = select(
            lm,
            ratios=ratios,
            prompts=prompts,
            seeds=seeds,
            steps=a.steps,
            features=a.features,
            size=a.size,
            log=lambda msg: print(msg, file=sys.stderr),
        )
        print(format_table(table))
        if a.output:
            write_table(table, Path(a.output))
            print(f"table written to {a.output}")

    return run_cli(go, a.debug, "blockskip-select")


if __name__ == "__main__":
    sys.exit(main())
