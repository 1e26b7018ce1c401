"""Quantised storage of the frozen weights (int8 per row, int4 in groups) against float32 storage of the
same model, on the block-streamed span: the loss curve and the trained LoRA stay close."""

import numpy as np
import pytest
from safetensors.numpy import load_file as load_np
from tiny_models import build

from blockskip.device_train.app import run_precompute
from blockskip.export.bundle_writer import export_bundle
from blockskip.export.families import wrap_model
from blockskip.runtime.backends.torch import TorchBlocks
from blockskip.runtime.bundle import Bundle
from blockskip.runtime.driver import train as drive
from blockskip.runtime.plan import Plan
from blockskip.runtime.profiles import load_profile
from blockskip.runtime.stream import StreamedSpan

PLAN = dict(
    front_skip=1,
    back_skip=2,
    s_min=32,
    s_max=64,
    num_samples=6,
    steps=10,
    lr=3e-3,
    weight_decay=0.05,
    lora_rank=4,
    lora_alpha=8.0,
    checkpoint_every=5,
    span="streamed",
)
# stated tolerances: the largest relative loss difference over ten steps (measured on this tiny FLUX,
# torch block backend: int8 4.7e-4, int4 1.1e-2; the tolerances leave about an 8x margin)
TOLERANCE = {"int8": 5e-3, "int4": 8e-2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, photos):
    out = {}
    for storage in ("float32", "int8", "int4"):
        root = tmp_path_factory.mktemp(f"storage-{storage}")
        export_bundle(
            wrap_model(build("flux"), "flux"),
            Plan(storage=storage, **PLAN),
            load_profile("desktop-cpu"),
            "a photo of sks cat",
            root / "b",
        )
        run_precompute(root / "b", photos, root / "c", quiet=True)
        bundle = Bundle(root / "b")
        log = drive(bundle, root / "c", root / "o", lambda o, b=bundle: StreamedSpan(b, TorchBlocks(b)))
        out[storage] = (np.array(log["losses"]), load_np(root / "o" / "lora.safetensors"))
    return out


@pytest.mark.parametrize("storage", ["int8", "int4"])
def test_quantised_storage_tracks_float32(storage, runs):
    ref, ref_lora = runs["float32"]
    got, lora = runs[storage]
    rel = np.abs(got / ref - 1)
    print(f"{storage}: max relative loss difference {rel.max():.2e}")
    assert rel.max() < TOLERANCE[storage]
    assert rel.max() > 0  # the storage is really quantised: the curves are not identical
    for k in ref_lora:
        d = np.linalg.norm(lora[k] - ref_lora[k]) / max(np.linalg.norm(ref_lora[k]), 1e-12)
        assert d < 20 * TOLERANCE[storage], (k, d)


def test_int4_is_coarser_than_int8(runs):
    ref = runs["float32"][0]
    assert np.abs(runs["int4"][0] / ref - 1).max() > np.abs(runs["int8"][0] / ref - 1).max()


def test_kept_forward_graph_gives_the_recomputed_vjp(tmp_path, photos):
    """The torch block backend keeps the last block's autograd graph from the forward sweep for its VJP
    (no recomputed forward): the gradients are those of the recomputing VJP, bit for bit, and a graph kept
    for other arrays is never used."""
    export_bundle(
        wrap_model(build("flux"), "flux"),
        Plan(storage="int8", **PLAN),
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        tmp_path / "b",
    )
    run_precompute(tmp_path / "b", photos, tmp_path / "c", quiet=True)
    bundle = Bundle(tmp_path / "b")
    span = StreamedSpan(bundle, TorchBlocks(bundle))
    from blockskip.runtime.cache import ResidualCache

    entry = span.load_entry(ResidualCache(tmp_path / "c").path(0))
    i, sid, names = span.blocks[-1]
    be, w, lora = span.be, span.weights.get(i), span._lora(names)
    state = {k[3:]: v for k, v in entry.items() if k.startswith("in.")}
    consts = {k[2:]: v for k, v in entry.items() if k.startswith("c.")}
    out = be.forward(sid, state, consts, w, lora)
    rng = np.random.default_rng(0)
    grads = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in out.items()}
    ref = be.vjp(sid, state, consts, grads, w, lora)  # nothing kept: recomputed
    assert be.kept is None
    kept_out = be.forward(sid, state, consts, w, lora, keep=True)
    assert be.kept is not None
    for k in out:
        np.testing.assert_array_equal(kept_out[k], out[k])
    got = be.vjp(sid, state, consts, grads, w, lora)
    assert be.kept is None  # dropped at the VJP
    for a, b in zip(ref, got):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    # a graph kept for other state arrays is not used (the VJP recomputes for the arrays it is given)
    be.forward(sid, state, consts, w, lora, keep=True)
    other = {k: v * 0.5 for k, v in state.items()}
    g_other = be.vjp(sid, other, consts, grads, w, lora)
    be2 = TorchBlocks(bundle)
    g_ref = be2.vjp(sid, other, consts, grads, w, lora)
    for k in g_ref[1]:
        np.testing.assert_array_equal(g_other[1][k], g_ref[1][k])
    span.close()


@pytest.mark.parametrize("storage", ["int8", "int4"])
def test_a_weight_bigger_than_a_chunk_quantises_row_by_row(storage):
    """The export quantises a weight a few MiB of rows at a time; rows are independent, so a weight of
    several chunks gives what quantising each row alone gives, from bfloat16 (a folder's dtype) as from
    its float32 copy."""
    import torch

    from blockskip.runtime.backends.torch_stream import CHUNK, quantise

    g = torch.Generator().manual_seed(0)
    row = 3072
    w = torch.randn(CHUNK // row * 3 + 5, row, generator=g).to(torch.bfloat16)
    whole = quantise(w, storage)
    assert quantise(w.float(), storage).keys() == whole.keys()
    for k, v in quantise(w.float(), storage).items():
        assert torch.equal(v, whole[k]), k
    for i in torch.randint(0, w.shape[0], (6,), generator=g).tolist() + [0, w.shape[0] - 1]:
        for k, v in quantise(w[i : i + 1], storage).items():
            assert torch.equal(v[0], whole[k][i]), (k, i)


CONVS = {
    "1x1": dict(in_channels=6, out_channels=10, kernel_size=1),
    "depthwise 3x3": dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=6),
    "depthwise unpadded": dict(in_channels=6, out_channels=6, kernel_size=3, groups=6, bias=False),
    "patchify 2x2": dict(in_channels=4, out_channels=8, kernel_size=2, stride=2),
    "3x3": dict(in_channels=4, out_channels=8, kernel_size=3, padding=1),
}


@pytest.mark.parametrize("storage", ["float32", "int8", "int4"])
@pytest.mark.parametrize("conv", list(CONVS))
def test_a_stream_conv_computes_conv2d_and_its_input_gradient(conv, storage):
    """A stream block's frozen Conv2d (SANA's 1x1 and depthwise 3x3, the patch embeddings) gives what
    ``nn.Conv2d`` with the dequantised weight gives, output and input gradient, and the 1x1, patchify
    and depthwise ones trace to programs without a convolution (XNNPACK delegates no convolution whose
    weight is an input)."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from blockskip.runtime.backends import torch_stream as ts

    torch.manual_seed(0)
    ref = torch.nn.Conv2d(**CONVS[conv])
    stored = ts.store_tensors(ref, storage)
    m = ts.StreamConv2d(ref, {k: (tuple(v.shape), v.dtype) for k, v in stored.items()}, "")
    m._buffers.update(stored)
    with torch.no_grad():
        ref.weight.copy_(ts.dequantise(m.stored()).reshape(ref.weight.shape))
    x = torch.randn(2, ref.in_channels, 6, 8, requires_grad=True)
    y = m(x)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    y_ref = ref(x)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-5, rtol=1e-5)

    def vjp(x, g):
        x = x.requires_grad_()
        return torch.autograd.grad(m(x), x, g)

    ops = {str(n.target) for n in make_fx(vjp)(x.detach(), g).graph.nodes if n.op == "call_function"}
    convolutions = {o for o in ops if "convolution" in o}
    assert bool(convolutions) == (conv == "3x3"), ops


@pytest.mark.parametrize("name", ["flux", "sd35", "sana"])
@pytest.mark.parametrize("storage", ["float32", "bfloat16", "int8", "int4"])
def test_layout_from_shapes_is_what_store_tensors_writes(name, storage):
    """The layout the dry run and the export read from shapes alone (``torch_stream.layout``) is the one
    ``store_tensors`` writes from real tensors, name by name and in its order, for every block and the head."""
    import torch

    from blockskip.runtime.backends import torch_stream as ts
    from blockskip.runtime.backends.torch_families import family_of_class, get_family

    model = build(name)
    fam = get_family(family_of_class(type(model).__name__), dict(model.config))
    skeleton = fam.skeleton()
    for i, path in enumerate(fam.block_paths()):
        real = ts.store_tensors(model.get_submodule(path), storage)
        assert list(ts.block_specs(fam, skeleton, i, storage).items()) == [
            (k, (tuple(v.shape), v.dtype)) for k, v in real.items()
        ], (name, storage, i)
    head = torch.nn.Module()
    for path in fam.head_prefixes:
        obj = getattr(model, path)
        if isinstance(obj, torch.nn.Module):
            head.add_module(path, obj)
        else:
            head.register_parameter(path, obj)
    real = ts.store_tensors(head, storage)
    assert list(ts.head_specs(fam, skeleton, storage).items()) == [
        (k, (tuple(v.shape), v.dtype)) for k, v in real.items()
    ]
    if storage in ("int8", "int4"):  # quantised layouts really differ from the float one
        assert any(k.endswith("_scale") for k in real)
