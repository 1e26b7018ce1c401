"""Streaming export of a model folder: the transformer is read from its safetensors shards block by
block (``export.folder_weights``), never loaded whole, and the bundle equals the one written from the
loaded model, file by file."""

import json

import pytest
import torch
from tiny_models import write_folder

from blockskip.export import folder_weights
from blockskip.export.bundle_writer import export_bundle
from blockskip.export.families import load_model
from blockskip.runtime.errors import ModelError
from blockskip.runtime.plan import Plan
from blockskip.runtime.profiles import load_profile

PLAN = dict(s_min=16, s_max=32, num_samples=2, steps=2, lora_rank=4)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _same_bundle(a, b):
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb)
    differ = [rel for rel in fa if fa[rel] != fb[rel]]
    assert not differ, differ


@pytest.fixture
def stores(monkeypatch):
    """Every FolderStore the export creates, to check how many blocks each held at once."""
    made = []
    cls = folder_weights.FolderStore

    class Spy(cls):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            self.read_bytes = {}  # part file -> bytes read
            made.append(self)

        def _read(self, rel):
            out = super()._read(rel)
            self.read_bytes[rel] = sum(t.numel() * t.element_size() for t in out.values())
            return out

    monkeypatch.setattr(folder_weights, "FolderStore", Spy)
    return made


@pytest.mark.parametrize("name", ["flux", "sd35", "sana"])
def test_streamed_folder_export_equals_the_loaded_models(tmp_path, name, stores):
    """Torch format, resident span, the transformer split in shards with an index."""
    root = write_folder(tmp_path / name, name, max_shard_size="40KB")
    assert (root / "transformer" / folder_weights.INDEX).is_file()
    assert len(list((root / "transformer").glob("*.safetensors"))) >= 3
    plan = Plan(front_skip=1, back_skip=1, **PLAN)
    export_bundle(
        load_model(str(root)), plan, load_profile("desktop-cpu"), "a photo of sks", tmp_path / "loaded"
    )
    lm = load_model(str(root), stream=True)
    assert all(p.device.type == "meta" for p in lm.transformer.parameters())  # nothing of it in memory
    export_bundle(lm, plan, load_profile("desktop-cpu"), "a photo of sks", tmp_path / "streamed")
    _same_bundle(tmp_path / "loaded", tmp_path / "streamed")
    assert stores and all(s.loaded for s in stores)


@pytest.mark.parametrize("folder_dtype", [torch.float32, torch.bfloat16])
def test_streamed_span_programs_hold_one_block_at_a_time(tmp_path, stores, folder_dtype):
    """A block-streamed onnx bundle with int8 storage: same files as from the loaded model, and every read of
    the folder held at most one block's tensors alive (weak references to what each load put in). A
    bfloat16 folder's blocks are read as stored (half the memory of float32) and give the same bundle as
    the model loaded in float32."""
    root = write_folder(tmp_path / "flux", "flux", max_shard_size="40KB", dtype=folder_dtype)
    plan = Plan(front_skip=1, back_skip=1, span="streamed", storage="int8", **PLAN)
    kw = dict(formats=["onnx"])
    export_bundle(
        load_model(str(root)), plan, load_profile("desktop-cpu"), "a photo of sks", tmp_path / "loaded", **kw
    )
    export_bundle(
        load_model(str(root), stream=True),
        plan,
        load_profile("desktop-cpu"),
        "a photo of sks",
        tmp_path / "streamed",
        **kw,
    )
    _same_bundle(tmp_path / "loaded", tmp_path / "streamed")
    blocks = [s for s in stores if any(rel.startswith("model/blocks/") for rel in s.loaded)]
    assert blocks, "no block was read from the folder"
    written = [
        b for b in json.loads((tmp_path / "streamed" / "manifest.json").read_text())["model"]["blocks"] if b
    ]
    assert sum(1 for rel in blocks[0].loaded if rel.startswith("model/blocks/")) == len(written)
    assert max(s.max_resident for s in stores) == 1
    assert blocks[0].dtype is None  # as stored


def test_a_held_block_is_seen(tmp_path):
    """The one-block check can fail: keeping a reference to a loaded block's tensors counts it as resident."""
    root = write_folder(tmp_path / "flux", "flux")
    store = load_model(str(root), stream=True).store()
    kept = []
    for i in range(3):
        names = store.load_block(i)
        kept += [t for n, t in store.model.named_parameters() if n in set(names)]
        store.free(names)
    assert store.max_resident == 3


def test_a_folder_missing_a_tensor_or_a_shard_is_refused(tmp_path):
    root = write_folder(tmp_path / "flux", "flux", max_shard_size="40KB")
    index = root / "transformer" / folder_weights.INDEX
    data = json.loads(index.read_text())
    name = sorted(data["weight_map"])[0]
    shard = data["weight_map"].pop(name)
    index.write_text(json.dumps(data))
    plan = Plan(front_skip=1, back_skip=1, **PLAN)
    with pytest.raises(ModelError, match="lack 1 tensor"):
        export_bundle(
            load_model(str(root), stream=True), plan, load_profile("desktop-cpu"), "x", tmp_path / "b"
        )
    data["weight_map"][name] = shard
    (root / "transformer" / shard).unlink()
    index.write_text(json.dumps(data))
    with pytest.raises(ModelError, match="not a file"):
        load_model(str(root), stream=True)


def test_a_shard_with_a_wrong_shape_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    root = write_folder(tmp_path / "flux", "flux")
    path = root / "transformer" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    name = next(n for n in state if n.startswith("transformer_blocks.0.") and state[n].dim() == 2)
    state[name] = torch.zeros(3, 3)
    save_file(state, path)
    store = load_model(str(root), stream=True).store()
    with pytest.raises(ModelError, match="has shape \\[3, 3\\]"):
        store.load_block(0)


_GROWTH = """
import sys, torch
from blockskip.export.families import load_model

def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 1024

store = load_model(sys.argv[1], torch.float32, stream=True).store()
after = []
for i in range(store.family.num_blocks):
    names = store.load_block(i)
    store.free(names)
    after.append(anon())
print(after[0], after[-1])
"""


def test_streaming_blocks_through_one_process_does_not_grow_it(tmp_path):
    """Each dropped block's memory goes back to the system (else glibc keeps it once its mmap threshold has
    risen: RSS then grows by about a block per block). Eight 25 MiB blocks stored in bfloat16, read one at a
    time as float32."""
    import subprocess
    import sys

    from diffusers import FluxTransformer2DModel

    root = write_folder(tmp_path / "flux", "flux")
    big = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=0,
        num_single_layers=8,
        attention_head_dim=64,
        num_attention_heads=12,
        joint_attention_dim=24,
        pooled_projection_dim=12,
        guidance_embeds=False,
        axes_dims_rope=(16, 24, 24),
    )
    big.to(torch.bfloat16).save_pretrained(root / "transformer", max_shard_size="60MB")  # read as float32
    del big
    r = subprocess.run([sys.executable, "-c", _GROWTH, str(root)], capture_output=True, text=True, check=True)
    first, last = map(float, r.stdout.split()[-2:])
    assert last - first < 20, (first, last)  # without returning memory: +63 MiB here


@pytest.mark.parametrize("name", ["flux", "sd35", "sana"])
def test_a_streamed_bundles_example_entry_is_traced_on_fake_tensors_with_the_real_shapes(tmp_path, name):
    """A block-streamed export needs only the cache entry's shapes: it computes them on fake tensors (no
    block read or run), the same names, shapes and dtypes as the entry the model really computes."""
    from torch._subclasses.fake_tensor import FakeTensor

    from blockskip.export.graphs import example_entry

    lm = load_model(str(write_folder(tmp_path / name, name)), stream=True)
    plan = Plan(front_skip=1, back_skip=1, span="streamed", **PLAN)
    trained = plan.validate(lm.family.num_blocks, lm.granularity, lm.family.valid_targets())
    text = lm.encode_prompt("a photo of sks")
    real, fake = example_entry(lm, plan, trained, text), example_entry(lm, plan, trained, text, fake=True)
    assert all(isinstance(t, FakeTensor) for t in fake.values())
    assert {k: (t.shape, t.dtype) for k, t in fake.items()} == {
        k: (t.shape, t.dtype) for k, t in real.items()
    }
    assert any(k.startswith("delta.") for k in real)  # the back residual: the frozen blocks really ran


@pytest.mark.parametrize(
    "storage,folder_dtype",
    [("int8", torch.bfloat16), ("bfloat16", torch.bfloat16), ("float32", torch.float32)],
)
def test_the_export_dry_run_counts_what_the_export_reads_and_writes(tmp_path, stores, storage, folder_dtype):
    """The export phase's parts, predicted from the model's structure, are the bytes the streaming export
    really reads and keeps: the largest block read from the folder with its storage copy (what the bundle's
    block file holds), the photo encoder's, embed, initial LoRA and prompt tensors (the bundle's files)."""
    from safetensors.torch import load_file

    from blockskip.export.memory.export_phase import export_dry_run

    root = write_folder(tmp_path / "flux", "flux", max_shard_size="40KB", dtype=folder_dtype)
    lm = load_model(str(root), stream=True)
    assert lm.weights.stored_dtype() == folder_dtype
    plan = Plan(front_skip=1, back_skip=1, span="streamed", storage=storage, **PLAN)
    got = export_dry_run(lm.model_spec(), plan, ["torch"], lm.weights.stored_dtype()).parts
    export_bundle(lm, plan, load_profile("desktop-cpu"), "a photo of sks", tmp_path / "b")

    def nbytes(rel):
        return sum(t.numel() * t.element_size() for t in load_file(tmp_path / "b" / rel).values())

    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    # what each block load read, less what the storage copy keeps of it (a tensor it did not convert: of the
    # folder's dtype and not a new scale), and the storage copy (the block file's tensors)
    reads = [s for s in stores if s.dtype is None]
    assert len(reads) == 1
    pairs = []
    for rel in filter(None, m["model"]["blocks"]):
        t = load_file(tmp_path / "b" / rel)
        kept = sum(
            v.numel() * v.element_size()
            for k, v in t.items()
            if v.dtype == folder_dtype and not k.endswith("_scale")
        )
        pairs.append((reads[0].read_bytes[rel] - kept, nbytes(rel)))
    assert (got["block_read"], got["block_stored"]) == max(pairs, key=sum)
    assert got["encoder"] == nbytes(m["encoder"]["file"])
    assert got["embed"] == nbytes(m["model"]["embed"])
    assert got["lora"] == nbytes(m["stream"]["lora_init"])
    assert got["prompt"] == nbytes(m["prompt"])


def test_the_export_dry_run_refuses_what_it_does_not_model():
    from blockskip.export.memory.export_phase import export_dry_run
    from blockskip.export.memory.specs import load_spec
    from blockskip.runtime.errors import PlanError

    spec, _ = load_spec("tiny-random")
    streamed = Plan(front_skip=1, back_skip=1, span="streamed", storage="int8", **PLAN)
    assert export_dry_run(spec, streamed, ["pte"]).stage in ("blocks", "embed", "kept", "programs", "encoder")
    with pytest.raises(PlanError, match="ONNX"):
        export_dry_run(spec, streamed, ["onnx"])
    with pytest.raises(PlanError, match="resident span"):
        export_dry_run(spec, Plan(front_skip=1, back_skip=1, **PLAN), ["pte"])
    assert export_dry_run(spec, Plan(front_skip=1, back_skip=1, **PLAN), ["torch"]).peak > 0
