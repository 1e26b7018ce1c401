"""Numerical equivalence of the BlockSkip pieces with the plain diffusers models (fp32, all families).

1. embed + every block + head (the family's segmented run) == the diffusers model's own forward.
2. BlockSkip with zero LoRA (precomputed front input, residuals of skipped spans) == the full frozen model.
3. With nothing skipped, TrainedSpan's loss / LoRA gradients (and the training loop's losses) == plain
   peft LoRA on the full diffusers model.
4. With a back skip (and gaps), every LoRA parameter gets a gradient through the residual adds; the
   text-only modules the export leaves out of the last trained block would really be dead.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from tiny_models import FAMILY, TINY_CONFIGS, build

from blockskip.device_train.app import run_precompute, run_train
from blockskip.export.bundle_writer import export_bundle
from blockskip.export.families import wrap_model
from blockskip.runtime.backends.torch import TrainedSpan
from blockskip.runtime.backends.torch_families.base import CropGeometry, run_span
from blockskip.runtime.backends.torch_families.latent import encode_images
from blockskip.runtime.backends.torch_io import BlockStore
from blockskip.runtime.backends.torch_sample import make_sample
from blockskip.runtime.bundle import Bundle
from blockskip.runtime.cache import ResidualCache
from blockskip.runtime.images import load_images
from blockskip.runtime.plan import Plan
from blockskip.runtime.profiles import load_profile

NAMES = ["flux", "flux-guidance", "sd3", "sd35", "sana"]
ATOL = 1e-5
PROMPT = "a photo of sks dog on grass"

# Splits for the skip tests (as functions of the number of blocks L; all tiny models have L >= 3).
SPLITS = {
    "n1m1": lambda L: dict(front_skip=1, back_skip=1),
    "n0m2": lambda L: dict(back_skip=2),
    "gap": lambda L: dict(trained=[0, 2]),  # middle gap (1,2); back span too when L >= 4
    "first-only": lambda L: dict(back_skip=L - 1),  # one trained block, everything after it skipped
}


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.float() - b.float()).abs().max().item()


def _num_blocks(name: str) -> int:
    return wrap_model(build(name)).family.num_blocks


def diffusers_forward(name, model, latent, sigma, text, guidance):
    """The diffusers model's own forward on a latent [1,C,h,w]; returns the prediction as [1,C,h,w]."""
    fam = wrap_model(model).family
    h, w = latent.shape[-2:]
    if FAMILY[name] == "flux":
        gh, gw = h // 2, w // 2
        img_ids = torch.zeros(gh, gw, 3, dtype=torch.long)
        img_ids[..., 1] = torch.arange(gh)[:, None]
        img_ids[..., 2] = torch.arange(gw)[None, :]
        kw = {}
        if TINY_CONFIGS[name]["guidance_embeds"]:
            kw["guidance"] = torch.full((1,), float(guidance))
        out = model(
            hidden_states=fam.to_tokens(latent),
            encoder_hidden_states=text["prompt_embeds"],
            pooled_projections=text["pooled"],
            timestep=sigma,
            img_ids=img_ids.reshape(-1, 3),
            txt_ids=torch.zeros(text["prompt_embeds"].shape[1], 3, dtype=torch.long),
            **kw,
        ).sample
        return fam.from_tokens(out, h, w)
    if FAMILY[name] == "sd3":
        return model(
            hidden_states=latent,
            encoder_hidden_states=text["prompt_embeds"],
            pooled_projections=text["pooled"],
            timestep=sigma * 1000,
        ).sample
    return model(
        hidden_states=latent, encoder_hidden_states=text["prompt_embeds"], timestep=sigma * 1000
    ).sample


def family_forward(fam, model, latent, sigma, text, geom, positions, guidance):
    """embed + all blocks + head with the family on a full in-memory model; tokens [1,N,D]."""
    prepared = fam.prepare_text(model, text)
    state, consts = fam.embed(model, latent, sigma, prepared, geom, positions, guidance)
    state = run_span(fam, model, 0, fam.num_blocks, state, consts)
    return fam.head(model, state, consts)


# --------------------------------------------------------------------------------------------
# 1. segmented forward == diffusers forward


@pytest.mark.parametrize("name", NAMES)
def test_segmented_forward_equals_diffusers(name):
    model = build(name)
    lm = wrap_model(model)
    fam = lm.family
    g = torch.Generator().manual_seed(7)
    h = 8  # latent side: 4x4 tokens for FLUX/SD3, 8x8 for SANA
    latent = torch.randn(1, lm.encoder.latent_channels, h, h, generator=g)
    text = lm.encode_prompt(PROMPT)
    sigma = torch.tensor([0.37])
    guidance = 2.5
    geom = CropGeometry(full=h, side=h, top=0, left=0, low=h)
    with torch.no_grad():
        ours = fam.from_tokens(
            family_forward(fam, model, latent, sigma, text, geom, "native", guidance), h, h
        )
        ref = diffusers_forward(name, model, latent, sigma, text, guidance)
        # "crop" positions for the whole s_max photo at s_min == s_max are the native positions
        crop = fam.from_tokens(family_forward(fam, model, latent, sigma, text, geom, "crop", guidance), h, h)
        # the comparison is sensitive: another timestep gives another output
        other = diffusers_forward(name, model, latent, sigma * 0.5, text, guidance)
    assert ours.shape == ref.shape == latent.shape
    assert torch.isfinite(ref).all()
    assert _maxdiff(ours, ref) <= ATOL
    assert _maxdiff(crop, ref) <= ATOL
    assert _maxdiff(other, ref) > 1e-3


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_from_tokens_inverts_to_tokens(name):
    fam = wrap_model(build(name)).family
    x = torch.randn(2, 4, 8, 8)
    t = fam.to_tokens(x)
    assert t.shape == (2, 16, 16)
    assert torch.equal(fam.from_tokens(t, 8, 8), x)


# --------------------------------------------------------------------------------------------
# bundles (exported + precomputed once per module)


class Run:
    """An exported, precomputed bundle and the inputs precompute made each cache entry from."""

    def __init__(self, name: str, root, plan: Plan, photos):
        self.name, self.root, self.plan = name, root, plan
        self.model = build(name)
        lm = wrap_model(self.model)
        self.fam = lm.family
        export_bundle(lm, plan, load_profile("desktop-cpu"), PROMPT, root / "bundle")
        run_precompute(root / "bundle", photos, root / "cache", quiet=True)
        self.bundle = Bundle(root / "bundle")
        self.cache = ResidualCache(root / "cache")
        # the reference inputs come from the in-memory model, not from the bundle's copies
        _, images = load_images(photos, plan.s_max)
        with torch.no_grad():
            self.latents = encode_images(lm.encoder, lm.encoder_spec, torch.from_numpy(images).float())
        self.prompt = lm.encode_prompt(PROMPT)  # raw prompt embeddings (fp32 plan: no cast)

    def entry(self, k: int) -> dict:
        return load_file(self.root / "cache" / f"entry_{k:05d}.safetensors")

    def sample(self, k: int):
        """(x_t, target, sigma, geometry) of cache entry k, rebuilt exactly as precompute does."""
        e = self.cache.schedule[k]
        return make_sample(
            self.latents[e.image], e, self.plan.s_min, self.plan.s_max, self.bundle.manifest["vae_factor"]
        )

    def span(self, lora: dict | None = None, seed: int | None = None) -> TrainedSpan:
        lora = lora or self.bundle.manifest["lora"]
        return TrainedSpan(
            BlockStore(self.bundle), self.bundle.trained, lora, self.plan.seed if seed is None else seed
        )


@pytest.fixture(scope="module")
def skip_runs(tmp_path_factory, photos):
    runs: dict = {}

    def get(name: str, split: str) -> Run:
        if (name, split) not in runs:
            L = _num_blocks(name)
            g = wrap_model(build(name)).granularity
            plan = Plan(
                s_min=2 * g,
                s_max=4 * g,
                num_samples=3,
                steps=1,
                lora_rank=4,
                lora_alpha=8.0,
                timestep_shift=3.0,
                guidance=2.0,
                seed=3,
                **SPLITS[split](L),
            )
            runs[name, split] = Run(name, tmp_path_factory.mktemp(f"{name}-{split}"), plan, photos)
        return runs[name, split]

    return get


def _expected_trained(split: str, L: int) -> list[int]:
    return {"n1m1": list(range(1, L - 1)), "n0m2": list(range(0, L - 2)), "gap": [0, 2], "first-only": [0]}[
        split
    ]


def _expected_delta_starts(trained: list[int], L: int) -> set[int]:
    starts = {a + 1 for a, b in zip(trained, trained[1:]) if b - a > 1}
    if trained[-1] < L - 1:
        starts.add(trained[-1] + 1)
    return starts


# --------------------------------------------------------------------------------------------
# 2. BlockSkip with zero LoRA == full frozen model


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("name", NAMES)
def test_blockskip_with_zero_lora_reproduces_full_model(name, split, skip_runs):
    run = skip_runs(name, split)
    fam, plan, L = run.fam, run.plan, run.fam.num_blocks
    trained = run.bundle.trained
    assert trained == _expected_trained(split, L)
    span = run.span()
    assert span.params and all(
        p.abs().max() == 0 for n, p in span.model.named_parameters() if ".lora_B." in n
    )
    for k in range(len(run.cache.schedule)):
        entry = run.entry(k)
        # the cache holds exactly one residual per skipped span after the first trained block
        starts = {int(n.split(".")[1]) for n in entry if n.startswith("delta.")}
        assert starts == _expected_delta_starts(trained, L)
        x_t, target, sigma, geom = run.sample(k)
        with torch.no_grad():
            ref = family_forward(fam, run.model, x_t, sigma, run.prompt, geom, plan.positions, plan.guidance)
            out = span.forward(entry)
            loss = span.loss(entry)
            # the residuals matter: without them the span gives another output
            no_delta = span.forward(
                {n: (torch.zeros_like(v) if n.startswith("delta.") else v) for n, v in entry.items()}
            )
        assert torch.isfinite(ref).all()
        assert _maxdiff(out, ref) <= ATOL, f"entry {k}"
        assert torch.equal(entry["target"], fam.to_tokens(target))
        assert abs(loss.item() - F.mse_loss(ref, fam.to_tokens(target)).item()) <= ATOL
        assert _maxdiff(no_delta, ref) > 1e-3


# --------------------------------------------------------------------------------------------
# 3. nothing skipped: TrainedSpan == peft LoRA on the full diffusers model


def _peft_full_model(name, lora: dict, lora_params: dict[str, torch.Tensor]):
    """The full diffusers model with plain peft LoRA on the same full module names, weights copied by name."""
    from peft import LoraConfig, inject_adapter_in_model

    full = build(name).requires_grad_(False)
    cfg = LoraConfig(r=lora["rank"], lora_alpha=lora["alpha"], target_modules=list(lora["targets"]))
    inject_adapter_in_model(cfg, full)
    params = {n: p for n, p in full.named_parameters() if ".lora_" in n}
    assert set(params) == set(lora_params)  # same LoRA modules, nothing more, nothing less
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(lora_params[n])
            p.requires_grad_(True)
    return full, params


def _randomize_lora_b(model, seed: int, std: float) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            if ".lora_B." in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture(scope="module")
def full_runs(tmp_path_factory, photos):
    runs: dict = {}

    def get(name: str) -> Run:
        if name not in runs:
            g = wrap_model(build(name)).granularity
            plan = Plan(
                front_skip=0,
                back_skip=0,
                s_min=4 * g,
                s_max=4 * g,
                patch_sampling=False,
                positions="native",
                num_samples=2,
                steps=2,
                lr=1e-2,
                weight_decay=0.0,
                lora_rank=3,
                lora_alpha=6.0,
                guidance=2.0,
                seed=5,
                checkpoint_every=100,
            )
            runs[name] = Run(name, tmp_path_factory.mktemp(f"{name}-full"), plan, photos)
        return runs[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_no_skip_loss_and_grads_equal_peft_on_full_model(name, full_runs):
    run = full_runs(name)
    fam, plan = run.fam, run.plan
    assert run.bundle.trained == list(range(fam.num_blocks))
    span = run.span()
    _randomize_lora_b(span.model, seed=11, std=0.05)
    ours = {n: p for n, p in span.model.named_parameters() if ".lora_" in n}
    full, theirs = _peft_full_model(
        name, run.bundle.manifest["lora"], {n: p.detach() for n, p in ours.items()}
    )
    for k in range(len(run.cache.schedule)):
        entry = run.entry(k)
        x_t, target, sigma, geom = run.sample(k)
        assert geom.side == geom.low == geom.full and geom.top == geom.left == 0  # the whole photo
        for p in list(ours.values()) + list(theirs.values()):
            p.grad = None
        loss = span.loss(entry)
        loss.backward()
        pred = diffusers_forward(name, full, x_t, sigma, run.prompt, plan.guidance)
        ref_loss = F.mse_loss(pred, target)
        ref_loss.backward()
        h = x_t.shape[-1]
        with torch.no_grad():
            assert _maxdiff(fam.from_tokens(span.forward(entry), h, h), pred) <= ATOL
        assert abs(loss.item() - ref_loss.item()) <= ATOL, (loss.item(), ref_loss.item())
        for n, p in ours.items():
            q = theirs[n]
            assert p.grad is not None and q.grad is not None, n
            assert q.grad.abs().max() > 0, n  # nontrivial: every LoRA weight matters here
            assert _maxdiff(p.grad, q.grad) <= ATOL, n


@pytest.mark.parametrize("name", NAMES)
def test_no_skip_training_losses_equal_peft_adamw(name, full_runs, tmp_path):
    """run_train's losses over two AdamW steps == the same two steps of peft LoRA on the full model."""
    run = full_runs(name)
    plan = run.plan
    log = run_train(run.root / "bundle", run.root / "cache", tmp_path / "out", quiet=True)
    assert len(log["losses"]) == plan.steps == 2
    init = run.span()  # the training run's initial LoRA (A from the plan seed, B zero)
    full, params = _peft_full_model(
        name,
        run.bundle.manifest["lora"],
        {n: p.detach() for n, p in init.model.named_parameters() if ".lora_" in n},
    )
    init_p = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(list(params.values()), lr=plan.lr, weight_decay=plan.weight_decay)
    ref = []
    for step in range(plan.steps):
        x_t, target, sigma, _ = run.sample(step % len(run.cache.schedule))
        loss = F.mse_loss(diffusers_forward(name, full, x_t, sigma, run.prompt, plan.guidance), target)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ref.append(loss.item())
    assert log["losses"] == pytest.approx(ref, rel=0, abs=ATOL)
    assert abs(ref[1] - ref[0]) > 1e-4  # the step moved something: the second loss is a real check
    # and the saved LoRA (alpha/rank folded into B) is the reference's after the last step
    saved = load_file(tmp_path / "out" / "lora.safetensors")
    scale = plan.alpha / plan.lora_rank
    assert {
        k.removeprefix("transformer.")
        .replace(".lora_A.", ".lora_A.default.")
        .replace(".lora_B.", ".lora_B.default.")
        for k in saved
    } == set(params)
    moved = 0.0
    for k, v in saved.items():
        n = (
            k.removeprefix("transformer.")
            .replace(".lora_A.", ".lora_A.default.")
            .replace(".lora_B.", ".lora_B.default.")
        )
        s = scale if ".lora_B." in n else 1.0
        want, update = params[n].detach() * s, (params[n].detach() - init_p[n]) * s
        # AdamW's first steps are ~lr * grad/|grad|, which amplifies rounding on ~zero gradients:
        # compare the whole tensor against the size of its update, not elementwise
        assert (v - want).norm() <= 0.05 * update.norm() + 1e-6, n
        if ".lora_B." in n:
            moved = max(moved, v.abs().max().item())
    assert moved > 0.5 * plan.lr


# --------------------------------------------------------------------------------------------
# 4. gradients reach every LoRA parameter through the residual adds


def _text_only_extra(span: TrainedSpan, trained: list[int]) -> list[str]:
    """Full names of the last trained block's text-only linears that exist in the model."""
    fam, last = span.fam, trained[-1]
    path = fam.block_paths()[last]
    out = []
    for t in fam.text_output_only(last):
        try:
            mod = span.model.get_submodule(f"{path}.{t}")
        except AttributeError:
            continue
        if isinstance(mod, torch.nn.Linear):
            out.append(f"{path}.{t}")
    return out


@pytest.mark.parametrize("split", list(SPLITS))
@pytest.mark.parametrize("name", NAMES)
def test_every_lora_param_gets_a_gradient(name, split, skip_runs):
    run = skip_runs(name, split)
    trained, L = run.bundle.trained, run.fam.num_blocks
    lora = run.bundle.manifest["lora"]
    paths = run.fam.block_paths()
    # LoRA lives exactly on the trained blocks
    assert {next(p for p in paths if t.startswith(p + ".")) for t in lora["targets"]} == {
        paths[i] for i in trained
    }
    span = run.span()
    _randomize_lora_b(span.model, seed=13, std=1e-2)
    entry = run.entry(0)
    span.loss(entry).backward()
    named = {n: p for n, p in span.model.named_parameters() if ".lora_" in n}
    assert len(named) == 2 * len(lora["targets"])
    dead = [n for n, p in named.items() if p.grad is None or p.grad.abs().max() == 0]
    assert not dead, f"LoRA parameters without gradient: {dead}"

    # The export leaves the last trained block's text-only modules out; check they really would be dead
    # (so the rule drops nothing that trains) whenever the last trained block is followed by skipped blocks.
    extra = [n for n in _text_only_extra(span, trained) if n not in lora["targets"]]
    if trained[-1] == L - 1 or not extra:
        return
    span2 = run.span(lora={**lora, "targets": list(lora["targets"]) + extra})
    _randomize_lora_b(span2.model, seed=13, std=1e-2)
    span2.loss(entry).backward()
    grads = {n: p.grad for n, p in span2.model.named_parameters() if ".lora_" in n}
    for n, gr in grads.items():
        module = n.split(".lora_")[0]
        if module in extra:
            assert gr is None or gr.abs().max() == 0, f"{module} is not text-only: it gets a gradient"
        else:
            assert gr is not None and gr.abs().max() > 0, n


def test_text_rule_is_exercised():
    """The dead-module check above is not vacuous: FLUX and SD3 drop text-only modules of the last block only."""
    from blockskip.export.families import lora_target_names

    for name in ("flux", "sd3", "sd35"):
        fam = wrap_model(build(name)).family
        b0, b1 = fam.block_paths()[:2]
        last0 = set(lora_target_names(fam, [0]))
        both = set(lora_target_names(fam, [0, 1]))
        for t in ("attn.add_q_proj", "attn.to_add_out", "ff_context.net.0.proj", "ff_context.net.2"):
            assert f"{b0}.{t}" not in last0 and f"{b1}.{t}" not in both  # last trained block: dropped
            assert f"{b0}.{t}" in both  # followed by a trained block: kept
        assert f"{b0}.attn.add_k_proj" in last0  # text keys feed the image: kept
