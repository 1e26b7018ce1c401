"""End-to-end on the built-in tiny model: streaming, never-loaded blocks, resume, LoRA output."""

import shutil

import pytest
import torch
from conftest import export_and_precompute
from safetensors.torch import load_file

from blockskip.device_train.app import run_precompute, run_train
from blockskip.export.bundle_writer import export_bundle
from blockskip.export.families import load_model
from blockskip.runtime.backends.torch import TrainedSpan
from blockskip.runtime.backends.torch_io import BlockStore
from blockskip.runtime.bundle import Bundle, write_manifest
from blockskip.runtime.cache import ResidualCache
from blockskip.runtime.plan import Plan
from blockskip.runtime.profiles import load_profile

PLAN = dict(
    front_skip=1,
    back_skip=2,
    s_min=32,
    s_max=64,
    num_samples=6,
    steps=6,
    lr=1e-2,
    lora_rank=4,
    lora_alpha=8.0,
    checkpoint_every=2,
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, photos):
    root = export_and_precompute(tmp_path_factory.mktemp("tiny"), Plan(**PLAN), photos)
    log = run_train(root / "bundle", root / "cache", root / "out", quiet=True)
    return root, log


def watch_resident_blocks(monkeypatch) -> list:
    """(block run, blocks whose parameters are materialised) at every block a BlockStore runs."""
    from blockskip.runtime.backends import torch_io

    seen = []
    run = torch_io.BlockStore.run_block

    def watching(self, i, state, consts):
        paths = self.family.block_paths()
        live = {
            j
            for j, p in enumerate(paths)
            if any(t.device.type != "meta" for t in self.model.get_submodule(p).parameters())
        }
        seen.append((i, live))
        return run(self, i, state, consts)

    monkeypatch.setattr(torch_io.BlockStore, "run_block", watching)
    return seen


def test_precompute_keeps_one_block_resident(tiny_run, photos, tmp_path, monkeypatch):
    """Watched from outside the store: whenever precompute runs a block, only that block's weights
    are materialised in the model (every other block's parameters are back on the meta device)."""
    root, _ = tiny_run
    seen = watch_resident_blocks(monkeypatch)
    run_precompute(root / "bundle", photos, tmp_path / "cache", quiet=True)
    assert len(seen) >= PLAN["num_samples"] * 6  # every block ran (back skip: the residual needs all 6)
    assert all(live == {i} for i, live in seen), [s for s in seen if s[1] != {s[0]}][:3]
    cache = ResidualCache(tmp_path / "cache")
    assert len(cache.schedule) == PLAN["num_samples"] and not cache.missing()


def test_chunked_precompute_gives_the_same_cache(tiny_run, photos, tmp_path):
    root, _ = tiny_run
    m = Bundle(root / "bundle").manifest
    # same bundle, fresh cache, two samples per pass over the blocks
    m["plan"]["precompute_chunk"] = 2
    b2 = tmp_path / "bundle"
    shutil.copytree(root / "bundle", b2)

    write_manifest(b2 / "manifest.json", m)
    run_precompute(b2, photos, tmp_path / "cache", quiet=True)
    for k in range(PLAN["num_samples"]):
        a = load_file(root / "cache" / f"entry_{k:05d}.safetensors")
        b = load_file(tmp_path / "cache" / f"entry_{k:05d}.safetensors")
        assert a.keys() == b.keys()
        for n in a:
            torch.testing.assert_close(a[n], b[n], rtol=0, atol=1e-6)


def test_training_never_loads_skipped_blocks(tiny_run, tmp_path):
    root, log = tiny_run
    bundle = Bundle(root / "bundle")
    trained = bundle.trained
    assert trained == [1, 2, 3]
    assert log["blocks_loaded"] == [bundle.manifest["model"]["blocks"][i] for i in trained]
    # stronger: delete every skipped block, the embedders and the encoder; training still runs
    b2 = tmp_path / "bundle"
    shutil.copytree(root / "bundle", b2)
    for i, rel in enumerate(bundle.manifest["model"]["blocks"]):
        if i not in trained:
            (b2 / rel).unlink()
    (b2 / bundle.manifest["model"]["embed"]).unlink()
    (b2 / bundle.manifest["encoder"]["file"]).unlink()
    log2 = run_train(b2, root / "cache", tmp_path / "out", quiet=True)
    assert log2["losses"] == pytest.approx(log["losses"], rel=1e-6)


def test_resume_equals_uninterrupted(tiny_run, tmp_path):
    root, log = tiny_run
    part = run_train(root / "bundle", root / "cache", tmp_path / "out", quiet=True, stop_after=3)
    assert len(part["losses"]) == 3 and "lora" not in part
    assert not (tmp_path / "out" / "lora.safetensors").exists()
    full = run_train(root / "bundle", root / "cache", tmp_path / "out", quiet=True)
    assert full["resumed_from"] == 2  # last checkpoint at step 2 (checkpoint_every=2)
    assert full["losses"] == pytest.approx(log["losses"], rel=1e-5)
    a = load_file(tmp_path / "out" / "lora.safetensors")
    b = load_file(root / "out" / "lora.safetensors")
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-5, atol=1e-7)


def _load_saved_lora(span, path, scale):
    """Copy a saved LoRA (diffusers names, alpha/rank folded into B) into a span's peft parameters."""
    params = dict(span.model.named_parameters())
    with torch.no_grad():
        for k, v in load_file(path).items():
            v = v / scale if ".lora_B." in k else v
            name = (
                k.removeprefix("transformer.")
                .replace(".lora_A.", ".lora_A.default.")
                .replace(".lora_B.", ".lora_B.default.")
            )
            params[name].copy_(v)


def test_training_is_deterministic_and_learns(tiny_run, photos, tmp_path):
    """Two runs give byte-identical LoRAs, and the trained LoRA lowers the loss on held-out cache
    entries (another schedule seed: other crops, timesteps and noise) by a stated margin."""
    root, log = tiny_run
    again = run_train(root / "bundle", root / "cache", tmp_path / "out", quiet=True)
    assert again["losses"] == log["losses"]
    a, b = load_file(root / "out" / "lora.safetensors"), load_file(tmp_path / "out" / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # held-out entries: same bundle, another seed
    m = Bundle(root / "bundle").manifest
    m["plan"]["seed"] = m["schedule"]["seed"] = 12345
    held = tmp_path / "held"
    shutil.copytree(root / "bundle", held)
    write_manifest(held / "manifest.json", m)
    run_precompute(held, photos, tmp_path / "held_cache", quiet=True)
    entries = [
        load_file(tmp_path / "held_cache" / f"entry_{k:05d}.safetensors") for k in range(PLAN["num_samples"])
    ]
    assert not torch.equal(
        entries[0]["target"], load_file(root / "cache" / "entry_00000.safetensors")["target"]
    )
    bundle = Bundle(root / "bundle")
    span = TrainedSpan(BlockStore(bundle), bundle.trained, bundle.manifest["lora"], seed=0)
    with torch.no_grad():
        before = sum(span.loss(e).item() for e in entries) / len(entries)
        _load_saved_lora(span, root / "out" / "lora.safetensors", PLAN["lora_alpha"] / PLAN["lora_rank"])
        after = sum(span.loss(e).item() for e in entries) / len(entries)
    # measured on this seed: 1.412 -> 1.339 (-5.2%); asserted: at least half of that drop
    assert after < before * (1 - 0.025), (before, after)


def test_lora_loads_into_diffusers_and_reproduces_training(tiny_run):
    root, _ = tiny_run
    bundle = Bundle(root / "bundle")
    path = root / "out" / "lora.safetensors"
    sd = load_file(path)
    full = load_model("tiny-random").transformer
    full.load_lora_adapter(str(path), adapter_name="subject", prefix="transformer")
    loaded = {n.replace(".subject.", ".") for n, _ in full.named_parameters() if ".lora_" in n}
    assert loaded == {k.removeprefix("transformer.") for k in sd}  # no missing, no unexpected keys
    # the trained span as training saw it, with the saved LoRA
    store = BlockStore(bundle)
    span = TrainedSpan(store, bundle.trained, bundle.manifest["lora"], seed=0)
    params = dict(span.model.named_parameters())
    scale = PLAN["lora_alpha"] / PLAN["lora_rank"]  # folded into lora_B on save
    with torch.no_grad():
        for k, v in sd.items():
            v = v / scale if ".lora_B." in k else v
            name = (
                k.removeprefix("transformer.")
                .replace(".lora_A.", ".lora_A.default.")
                .replace(".lora_B.", ".lora_B.default.")
            )
            params[name].copy_(v)
    entry = load_file(root / "cache" / "entry_00000.safetensors")
    fam = store.family
    consts = {n[2:]: v for n, v in entry.items() if n.startswith("c.")}
    s_span = {n[3:]: v for n, v in entry.items() if n.startswith("in.")}
    s_full = dict(s_span)
    with torch.no_grad():
        for i in bundle.trained:
            s_span = fam.run_block(span.model, i, s_span, consts)
            s_full = fam.run_block(full, i, s_full, consts)
            torch.testing.assert_close(s_full["hidden"], s_span["hidden"], rtol=1e-5, atol=1e-5)
        # and the LoRA matters: without it the block outputs differ
        full.disable_lora() if hasattr(full, "disable_lora") else None
        s_off = {n[3:]: v for n, v in entry.items() if n.startswith("in.")}
        for i in bundle.trained:
            s_off = fam.run_block(full, i, s_off, consts)
    assert (s_off["hidden"] - s_span["hidden"]).abs().max() > 1e-4


def test_grad_accumulation_counts_micro_steps(photos, tmp_path):
    """Each optimizer step over grad_accum=3 micro-steps is one AdamW step on the mean loss of the same
    three cache entries (the schedule in order, wrapping around), computed here with autograd on a
    fresh span."""
    from blockskip.runtime.backends.torch import make_optimizer

    plan = Plan(**{**PLAN, "steps": 2, "grad_accum": 3, "num_samples": 4})
    export_bundle(load_model("tiny-random"), plan, load_profile("desktop-cpu"), "a photo", tmp_path / "b")
    run_precompute(tmp_path / "b", photos, tmp_path / "c", quiet=True)
    log = run_train(tmp_path / "b", tmp_path / "c", tmp_path / "o", quiet=True)
    bundle = Bundle(tmp_path / "b")
    entries = [load_file(tmp_path / "c" / f"entry_{k:05d}.safetensors") for k in range(4)]

    def reference(micro):
        span = TrainedSpan(BlockStore(bundle), bundle.trained, bundle.manifest["lora"], seed=bundle.plan.seed)
        opt, losses = make_optimizer(span.params, bundle.plan), []
        for batch in ([0, 1, 2], [3, 0, 1]):
            loss = sum(span.loss(entries[k]) for k in batch[:micro]) / 3
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        return losses, {n: p.detach() for n, p in span.model.named_parameters() if ".lora_" in n}

    losses, ref = reference(3)
    assert log["losses"] == pytest.approx(losses, rel=1e-5)
    scale = PLAN["lora_alpha"] / PLAN["lora_rank"]
    got = load_file(tmp_path / "o" / "lora.safetensors")
    assert len(got) == len(ref)
    for k, v in got.items():
        name = (
            k.removeprefix("transformer.")
            .replace(".lora_A.", ".lora_A.default.")
            .replace(".lora_B.", ".lora_B.default.")
        )
        want = ref[name] * scale if ".lora_B." in k else ref[name]
        torch.testing.assert_close(v, want, rtol=1e-4, atol=1e-6)
    # the reference can tell: dropping the last micro-step of each step gives another LoRA
    _, two = reference(2)
    assert max((two[n] - ref[n]).abs().max().item() for n in ref) > 1e-4


def test_tiny_latent_mapping_is_a_projection():
    from blockskip.export.tiny import build_tiny_encoder

    enc = build_tiny_encoder()
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = enc.encode(x)
    assert z.shape == (2, 8, 8, 8)
    # orthonormal rows: decode(encode(.)) is idempotent and encode(decode(z)) == z
    torch.testing.assert_close(enc.encode(enc.decode(z)), z, rtol=1e-5, atol=1e-5)
    assert 0.1 < z.std() < 2.0


@pytest.mark.parametrize("name", ["flux", "sd3", "sd35", "sana"])
def test_streaming_and_never_loaded_per_family(name, photos, tmp_path, monkeypatch):
    from tiny_models import build

    from blockskip.export.families import wrap_model

    lm = wrap_model(build(name))
    g = lm.granularity
    plan = Plan(front_skip=1, back_skip=1, s_min=4 * g, s_max=8 * g, num_samples=3, steps=2)
    export_bundle(lm, plan, load_profile("desktop-cpu"), "a photo", tmp_path / "b")
    seen = watch_resident_blocks(monkeypatch)
    run_precompute(tmp_path / "b", photos, tmp_path / "c", quiet=True)
    assert seen and all(live == {i} for i, live in seen), [s for s in seen if s[1] != {s[0]}][:3]
    monkeypatch.undo()
    bundle = Bundle(tmp_path / "b")
    for i, rel in enumerate(bundle.manifest["model"]["blocks"]):
        if i not in bundle.trained:
            (tmp_path / "b" / rel).unlink()  # skipped blocks are gone: training must not need them
    log = run_train(tmp_path / "b", tmp_path / "c", tmp_path / "o", quiet=True)
    assert log["blocks_loaded"] == [bundle.manifest["model"]["blocks"][i] for i in bundle.trained]
    assert len(log["losses"]) == 2


def test_precompute_runs_only_the_blocks_it_needs():
    from blockskip.runtime.backends.torch import blocks_to_run

    assert blocks_to_run([0, 1, 2, 3, 4, 5], 6) == 0  # nothing skipped: embeddings only
    assert blocks_to_run([2, 3, 4, 5], 6) == 2  # front skip only: up to the span
    assert blocks_to_run([1, 2, 3], 6) == 6  # back skip: the residual needs every block
    assert blocks_to_run([0, 3, 4, 5], 6) == 3  # a middle gap, no back skip: up to the gap end


def test_front_skip_without_back_skip_stores_the_exact_span_input(photos, tmp_path):
    """n > 0, m = 0: the span input must be the state after the front blocks, not the embeddings."""
    from blockskip.runtime.backends.torch_families.base import run_span

    lm = load_model("tiny-random")
    plan = Plan(front_skip=2, back_skip=0, s_min=32, s_max=64, num_samples=2, steps=1)
    export_bundle(lm, plan, load_profile("desktop-cpu"), "a photo", tmp_path / "b")
    run_precompute(tmp_path / "b", photos, tmp_path / "c", quiet=True)
    full = load_file(tmp_path / "c" / "entry_00000.safetensors")
    plan0 = Plan(front_skip=0, back_skip=0, s_min=32, s_max=64, num_samples=2, steps=1)
    export_bundle(lm, plan0, load_profile("desktop-cpu"), "a photo", tmp_path / "b0")
    run_precompute(tmp_path / "b0", photos, tmp_path / "c0", quiet=True)
    emb = load_file(tmp_path / "c0" / "entry_00000.safetensors")
    state = {n[3:]: v for n, v in emb.items() if n.startswith("in.")}
    consts = {n[2:]: v for n, v in emb.items() if n.startswith("c.")}
    with torch.no_grad():
        ref = run_span(lm.family, lm.transformer, 0, 2, state, consts)
    torch.testing.assert_close(full["in.hidden"], ref["hidden"], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(full["in.hidden"], emb["in.hidden"])


def test_without_the_back_residual_the_back_blocks_are_dropped(photos, tmp_path):
    """back_residual=False (the ablation): no delta in the cache, precompute stops at the span, and the
    span's output is the trained blocks straight into the head."""
    from blockskip.runtime.backends.torch import blocks_to_run, span_forward
    from blockskip.runtime.backends.torch_families.base import run_span

    assert blocks_to_run([1, 2, 3], 6, back_residual=False) == 1
    assert blocks_to_run([0, 3, 4], 6, back_residual=False) == 3  # a middle gap keeps its residual
    lm = load_model("tiny-random")
    plan = Plan(front_skip=1, back_skip=2, s_min=32, s_max=64, num_samples=2, steps=1, back_residual=False)
    export_bundle(lm, plan, load_profile("desktop-cpu"), "a photo", tmp_path / "b")
    run_precompute(tmp_path / "b", photos, tmp_path / "c", quiet=True)
    entry = load_file(tmp_path / "c" / "entry_00000.safetensors")
    assert not any(k.startswith("delta.") for k in entry)
    with_resid = Plan(front_skip=1, back_skip=2, s_min=32, s_max=64, num_samples=2, steps=1)
    export_bundle(lm, with_resid, load_profile("desktop-cpu"), "a photo", tmp_path / "b1")
    run_precompute(tmp_path / "b1", photos, tmp_path / "c1", quiet=True)
    entry1 = load_file(tmp_path / "c1" / "entry_00000.safetensors")
    assert any(k.startswith("delta.") for k in entry1)
    torch.testing.assert_close(entry["in.hidden"], entry1["in.hidden"])  # same sample, same span input
    fam, model = lm.family, lm.transformer
    consts = {n[2:]: v for n, v in entry.items() if n.startswith("c.")}
    with torch.no_grad():
        ref = fam.head(
            model,
            run_span(fam, model, 1, 4, {n[3:]: v for n, v in entry.items() if n.startswith("in.")}, consts),
            consts,
        )
        got = span_forward(fam, model, [1, 2, 3], [(4, 6)], entry)
        with_delta = span_forward(fam, model, [1, 2, 3], [(4, 6)], entry1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (with_delta - got).abs().max() > 1e-4
