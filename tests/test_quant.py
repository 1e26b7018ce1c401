"""int8 / 4-bit frozen base weights of the trained span with LoRA on top (Plan.base_quant).

One tiny bundle and one cache; the three runs differ only in the plan's ``base_quant`` (changed in the
loaded manifest, so the cache, which belongs to the bundle file, is shared).
"""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

pytest.importorskip("optimum.quanto")

from conftest import export_and_precompute  # noqa: E402
from optimum.quanto import QLinear  # noqa: E402

from blockskip.export.families import load_model, lora_target_names  # noqa: E402
from blockskip.runtime.backends import torch as torch_backend  # noqa: E402
from blockskip.runtime.backends.torch_io import BlockStore  # noqa: E402
from blockskip.runtime.backends.torch_lora import inject_lora  # noqa: E402
from blockskip.runtime.backends.torch_quant import quantize_frozen  # noqa: E402
from blockskip.runtime.bundle import Bundle  # noqa: E402
from blockskip.runtime.errors import BlockSkipError, PlanError  # noqa: E402
from blockskip.runtime.plan import Plan  # noqa: E402

PLAN = dict(
    front_skip=1,
    back_skip=2,
    s_min=32,
    s_max=64,
    num_samples=6,
    steps=8,
    lr=1e-2,
    lora_rank=4,
    lora_alpha=8.0,
    checkpoint_every=4,
)
MODES = ("none", "int8", "nf4")


def bundle_with(root, base_quant: str) -> Bundle:
    b = Bundle(root / "bundle")
    b.manifest["plan"]["base_quant"] = base_quant  # in memory only: the cache still matches the file
    return b


def frozen_bytes(model: nn.Module) -> int:
    """Bytes of the materialised frozen tensors (quantised ones by their inner data and scales)."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if is_traceable_wrapper_subclass(t):
            for name in t.__tensor_flatten__()[0]:
                add(getattr(t, name))
        elif t.device.type != "meta" and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()

    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        if ".lora_" not in n:
            add(t)
    return total


def linear_weight_bytes(model: nn.Module, prefixes: list[str]) -> int:
    """fp32 bytes of every linear weight under the prefixes (the part that gets quantised)."""
    return sum(
        m.in_features * m.out_features * 4
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and ".lora_" not in n and any(n.startswith(p + ".") for p in prefixes)
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory, photos):
    root = export_and_precompute(tmp_path_factory.mktemp("quant"), Plan(**PLAN), photos)
    logs = {q: torch_backend.train(bundle_with(root, q), root / "cache", root / f"out_{q}") for q in MODES}
    return root, logs


def test_losses_track_the_unquantised_run(runs):
    _, logs = runs
    ref = torch.tensor(logs["none"]["losses"])
    for q, tol in (("int8", 2e-3), ("nf4", 2e-2)):
        got = torch.tensor(logs[q]["losses"])
        assert got.shape == ref.shape
        assert abs(got[0] - ref[0]) / ref[0] < tol / 2, (q, got[0], ref[0])  # LoRA is zero: base error only
        assert ((got - ref).abs() / ref).max() < tol, (q, got.tolist(), ref.tolist())
        assert logs[q]["plan"]["base_quant"] == q
    assert logs["int8"]["losses"] != logs["none"]["losses"]  # the quantised base was really used


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_trained_linears_are_quantised_with_lora_on_top(runs, mode):
    root, _ = runs
    b = bundle_with(root, mode)
    span = torch_backend.TrainedSpan(BlockStore(b), b.trained, b.manifest["lora"], 0)  # plan from the bundle
    assert span.base_quant == mode
    model, paths = span.model, span.fam.block_paths()
    prefixes = [paths[i] for i in b.trained]
    mods = dict(model.named_modules())
    under = {
        n: m for n, m in mods.items() if any(n.startswith(p + ".") for p in prefixes) and ".lora_" not in n
    }
    plain = [n for n, m in under.items() if type(m) is nn.Linear]
    assert not plain, f"unquantised linears left in the trained span: {plain}"
    q = {n: m for n, m in under.items() if isinstance(m, QLinear)}
    assert any(n.endswith("norm1.linear") for n in q) and any(
        n.endswith("norm.linear") for n in q
    )  # adaLN too
    for n, m in q.items():
        inner = m.weight._data
        if mode == "int8":
            assert inner.dtype == torch.int8, n
        else:
            assert inner.dtype == torch.uint8 and type(m.weight).__name__.endswith("WeightQBitsTensor"), n
        assert not m.weight.requires_grad
    for t in b.manifest["lora"]["targets"]:
        wrapped = mods[t]
        assert hasattr(wrapped, "lora_A") and isinstance(wrapped.base_layer, QLinear), t
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert {id(p) for p in span.params} == {id(p) for n, p in model.named_parameters() if p.requires_grad}
    # the skipped blocks were never loaded, and the head stays in the plan dtype
    assert all(
        mods[p].proj_out.weight.device.type == "meta"
        for i, p in enumerate(paths)
        if i not in b.trained and "single" in p
    )
    assert type(model.proj_out) is nn.Linear and model.proj_out.weight.dtype == torch.float32


@pytest.mark.parametrize("mode", MODES)
def test_lora_output_loads_into_the_full_diffusers_model(runs, mode):
    root, logs = runs
    path = root / f"out_{mode}" / "lora.safetensors"
    assert logs[mode]["lora"] == str(path)
    sd = load_file(path)
    ref = load_file(root / "out_none" / "lora.safetensors")
    assert sd.keys() == ref.keys() and all(sd[k].dtype == ref[k].dtype for k in sd)
    full = load_model("tiny-random").transformer
    full.load_lora_adapter(str(path), adapter_name="subject", prefix="transformer")
    loaded = {n.replace(".subject.", ".") for n, _ in full.named_parameters() if ".lora_" in n}
    assert loaded == {k.removeprefix("transformer.") for k in sd}  # no missing, no unexpected keys
    assert any(v.abs().max() > 0 for n, v in sd.items() if ".lora_B." in n)


def test_dry_run_predicts_the_smaller_trained_base(runs):
    from blockskip.export.memory.dryrun import dry_run
    from blockskip.export.memory.specs import load_spec

    root, _ = runs
    spec, _ = load_spec("tiny-random")
    base, real = {}, {}
    for q in MODES:
        plan = Plan(**{**PLAN, "base_quant": q})
        trained = plan.validate(spec.family.num_blocks, spec.granularity, spec.family.valid_targets())
        lora = {
            "rank": plan.lora_rank,
            "alpha": plan.alpha,
            "targets": lora_target_names(spec.family, trained),
        }
        train = next(r for r in dry_run(spec, plan, lora, num_images=3, train_steps=1) if r.phase == "train")
        base[q] = train.tensors["trained_base"]
        b = bundle_with(root, q)
        real[q] = frozen_bytes(
            torch_backend.TrainedSpan(BlockStore(b), b.trained, b.manifest["lora"], 0).model
        )
    assert base == real  # the prediction is the bytes the real span holds, mode by mode
    assert base["none"] > base["int8"] > base["nf4"]
    model = load_model("tiny-random").transformer
    paths = spec.family.block_paths()
    lin = linear_weight_bytes(model, [paths[i] for i in Bundle(root / "bundle").trained])
    rest = base["none"] - lin  # biases, norms and the head: not quantised
    # int8: 1 byte + a per-row scale; 4-bit: half a byte + per-group scale and shift. The tiny model's
    # 64-wide rows make the scales weigh more than at full size (3072 wide: 0.2503 and 0.1406).
    assert 0.25 <= (base["int8"] - rest) / lin < 0.28
    assert 0.125 <= (base["nf4"] - rest) / lin < 0.16


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_fake_quantisation_has_the_real_bytes(mode, dtype):
    """The dry run quantises fake tensors; bf16 4-bit with 128-wide groups takes quanto's tinygemm
    layout for real tensors and the packed layout for fake ones: the bytes must agree."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from blockskip.export.memory.dryrun import _rebinding_apply
    from blockskip.export.memory.tracer import MemoryTracer

    def build():
        root = nn.Module()
        root.blk = nn.Sequential(nn.Linear(256, 512, dtype=dtype), nn.Linear(512, 96, dtype=dtype))
        return root.requires_grad_(False)

    real = build()
    quantize_frozen(real, ["blk"], mode, ["blk.0"])
    if mode == "nf4" and dtype == torch.bfloat16:
        assert type(real.blk[0].weight).__name__ == "TinyGemmWeightQBitsTensor"
    with FakeTensorMode(allow_non_fake_inputs=True), _rebinding_apply():
        tr = MemoryTracer()
        with tr:
            fake = build()
            quantize_frozen(fake, ["blk"], mode, ["blk.0"])
            live = tr.current
    assert live == frozen_bytes(real) < frozen_bytes(build())


@pytest.mark.parametrize("mode", ["int8", "nf4"])
def test_bitsandbytes_path_uses_peft_bnb_wrappers(mode):
    """The CUDA path (bitsandbytes), run here on CPU: peft must pick its bnb LoRA wrappers."""
    bnb = pytest.importorskip("bitsandbytes")
    lm = load_model("tiny-random")
    model, fam = lm.transformer, lm.family
    trained = [1, 2]
    targets = lora_target_names(fam, trained)
    paths = fam.block_paths()
    done = quantize_frozen(model, [paths[i] for i in trained], mode, targets, backend="bnb")
    cls = bnb.nn.Linear8bitLt if mode == "int8" else bnb.nn.Linear4bit
    assert done and all(isinstance(model.get_submodule(n), cls) for n in done)
    torch.manual_seed(0)
    inject_lora(model, {"rank": 4, "alpha": 4.0, "targets": targets})
    for t in targets:
        m = model.get_submodule(t)
        assert type(m).__module__ == "peft.tuners.lora.bnb" and isinstance(m.base_layer, cls), t
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_B." in n:
                p.normal_(0, 0.01)
    blk = model.single_transformer_blocks[0]  # block 2
    g = torch.Generator().manual_seed(0)
    h, e, temb = (
        torch.randn(1, 16, 64, generator=g),
        torch.randn(1, 8, 64, generator=g),
        torch.randn(1, 64, generator=g),
    )
    rope = (torch.ones(24, 16), torch.zeros(24, 16))
    _, out = blk(hidden_states=h, encoder_hidden_states=e, temb=temb, image_rotary_emb=rope)
    out.pow(2).mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith(paths[2]) and ".lora_" in n]
    assert grads and all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert any(gr.abs().max() > 0 for gr in grads)


def test_plan_and_cli_name_the_valid_modes(tmp_path):
    with pytest.raises(PlanError, match="none, int8, nf4"):
        Plan(base_quant="int4").validate(6, 8)
    assert Plan(base_quant="nf4").validate(6, 8) == list(range(6))
    from blockskip.export.cli import main as export_main

    rc = export_main(
        [
            "--model",
            "tiny-random",
            "--profile",
            "desktop-cpu",
            "--prompt",
            "a photo",
            "-n",
            "1",
            "-m",
            "2",
            "--s-min",
            "32",
            "--s-max",
            "64",
            "--samples",
            "2",
            "--base-quant",
            "int8",
            "-o",
            str(tmp_path / "b"),
        ]
    )
    assert rc == 0
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["plan"]["base_quant"] == "int8"
    with pytest.raises(SystemExit):
        export_main(
            ["--model", "tiny-random", "--prompt", "p", "-o", str(tmp_path / "c"), "--base-quant", "int4"]
        )


def test_missing_library_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "optimum.quanto", None)  # import fails as if not installed
    root = nn.Module()
    root.blk = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(BlockSkipError, match=r"pip install 'dit-blockskip\[quant\]'"):
        quantize_frozen(root, ["blk"], "int8", [], backend="quanto")
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(BlockSkipError, match=r"dit-blockskip\[quant\]"):
        quantize_frozen(root, ["blk"], "nf4", [], backend="bnb")


def test_resume_with_a_quantised_base_equals_uninterrupted(runs, tmp_path):
    root, logs = runs
    b = bundle_with(root, "nf4")
    part = torch_backend.train(b, root / "cache", tmp_path / "out", stop_after=5)
    assert len(part["losses"]) == 5
    full = torch_backend.train(b, root / "cache", tmp_path / "out")
    assert full["resumed_from"] == 4
    assert full["losses"] == pytest.approx(logs["nf4"]["losses"], rel=1e-5)


@pytest.mark.parametrize(
    "mode,dtype",
    [("int8", torch.float32), ("nf4", torch.float32), ("int8", torch.bfloat16), ("nf4", torch.bfloat16)],
)
def test_lora_on_the_quantised_base_equals_lora_on_its_dequantised_twin(mode, dtype):
    """Output and LoRA gradients through a quantised linear (bf16 4-bit: quanto's tinygemm kernel) are
    those of a plain linear holding the dequantised weight."""
    torch.manual_seed(0)
    q = nn.Module()
    q.blk = nn.Sequential(nn.Linear(256, 384, dtype=dtype), nn.GELU(), nn.Linear(384, 128, dtype=dtype))
    q.requires_grad_(False)
    quantize_frozen(q, ["blk"], mode, ["blk.0", "blk.2"])
    twin = nn.Module()
    twin.blk = nn.Sequential(nn.Linear(256, 384, dtype=dtype), nn.GELU(), nn.Linear(384, 128, dtype=dtype))
    with torch.no_grad():
        for i in (0, 2):
            twin.blk[i].weight.copy_(q.blk[i].weight.dequantize())
            twin.blk[i].bias.copy_(q.blk[i].bias)
    lora = {"rank": 4, "alpha": 4.0, "targets": ["blk.0", "blk.2"]}
    for m in (q, twin):
        torch.manual_seed(1)
        inject_lora(m, lora)
        torch.manual_seed(2)
        with torch.no_grad():
            for n, p in m.named_parameters():
                if ".lora_B." in n:
                    p.normal_(0, 0.05)
    x = torch.randn(2, 16, 256, dtype=dtype)
    outs = []
    for m in (q, twin):
        y = m.blk(x)
        y.float().pow(2).mean().backward()
        outs.append(
            (y.detach().float(), {n: p.grad.float() for n, p in m.named_parameters() if ".lora_" in n})
        )
    (yq, gq), (yt, gt) = outs
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(yq, yt, **tol)
    assert gq.keys() == gt.keys() and gq
    for n in gq:
        torch.testing.assert_close(gq[n], gt[n], **tol)


def test_checkpointing_over_a_quantised_base_gives_the_same_losses(runs, tmp_path):
    assert Plan(checkpointing=True).checkpointing is True  # the field exists (a rename fails here)
    root, logs = runs
    b = bundle_with(root, "nf4")
    b.manifest["plan"]["checkpointing"] = True
    log = torch_backend.train(b, root / "cache", tmp_path / "out")
    assert log["plan"]["checkpointing"] is True  # the run really recomputed activations
    assert log["losses"] == pytest.approx(logs["nf4"]["losses"], rel=1e-6)
