"""ONNX Runtime specifics: the ``onnx`` section of a bundle, the CLI, the refusals and the install. Training
against the torch backend (every family, both spans) is the shared contract suite (tests/test_contract.py)."""

import importlib.metadata
import json
import shutil
import struct

import numpy as np
import pytest
from safetensors.torch import load_file

pytest.importorskip("onnxruntime.training.api")

from blockskip.device_train import cli as device_cli  # noqa: E402
from blockskip.export import cli as export_cli  # noqa: E402
from blockskip.export.bundle_writer import export_bundle  # noqa: E402
from blockskip.export.families import load_model  # noqa: E402
from blockskip.runtime.bundle import Bundle  # noqa: E402
from blockskip.runtime.plan import Plan  # noqa: E402
from blockskip.runtime.profiles import load_profile  # noqa: E402
from blockskip.runtime.tensorfile import read_tensors  # noqa: E402

PLAN = dict(
    s_min=32,
    s_max=64,
    num_samples=6,
    steps=10,
    lr=3e-3,
    weight_decay=0.05,
    lora_rank=4,
    lora_alpha=8.0,
    checkpoint_every=3,
)


@pytest.fixture(scope="module")
def tiny_ort(tmp_path_factory, photos):
    root = tmp_path_factory.mktemp("tiny-ort")
    plan = Plan(front_skip=1, back_skip=2, **PLAN)
    export_bundle(
        load_model("tiny-random"),
        plan,
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        root / "bundle",
        formats=["onnx"],
    )
    return root


def test_onnx_section_and_programs(tiny_ort):
    """Opset 18 / IR 10 everywhere; the stream programs take the block weights as inputs (no weight
    initialisers: they stream from the block files, which an onnx-only bundle holds for that)."""
    import onnx

    bundle = Bundle(tiny_ort / "bundle")
    m = bundle.manifest
    assert m["formats"] == ["onnx"]
    sec = m["onnx"]
    assert sec["opset"] == 18 and sec["train"]["optimizer"]["adam_mode"] == 0
    progs = [p["onnx"]["file"] for s in m["stream"]["shapes"].values() for p in s["programs"].values()]
    assert progs and len(progs) == len(set(progs))
    for rel in [sec["train"]["files"][k] for k in ("training", "eval", "optimizer")] + progs:
        proto = onnx.load(str(bundle.path(rel)), load_external_data=False)
        assert proto.ir_version == 10, rel
        assert {o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")} == {18}, rel
        if rel in progs:
            big = [i for i in proto.graph.initializer if np.prod(i.dims) > 64]
            if "embed" in rel:  # computed tables (positions, frequencies) may be constants; weights never
                from onnx import numpy_helper

                embed = read_tensors(bundle.path(m["model"]["embed"]))
                weights = {a.astype(np.float32).tobytes() for a in embed.values() if a.size > 64}
                big = [i for i in big if numpy_helper.to_array(i).astype(np.float32).tobytes() in weights]
            assert not big, (rel, [i.name for i in big[:5]])
            assert any(i.name.startswith("w.") for i in proto.graph.input), rel
    # the back residual f(out) - f(in) runs the skipped blocks once: every block is stored, in float32
    blocks = m["model"]["blocks"]
    assert all(blocks) and m["stream"]["storage"] == "float32"


def test_device_train_cli_ort_end_to_end(tiny_ort, photos, capsys):
    root = tiny_ort
    rc = device_cli.main(
        [
            "run",
            str(root / "bundle"),
            "--images",
            str(photos),
            "-o",
            str(root / "out"),
            "--backend",
            "ort",
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    log = json.loads((root / "out" / "train_log.json").read_text())
    assert log["backend"] == "ort" and len(log["losses"]) == PLAN["steps"]
    cache = json.loads((root / "out" / "cache" / "index.json").read_text())
    assert cache["max_resident_blocks"] == 1  # one block session alive at a time
    # the LoRA loads into the full diffusers model: no missing, no unexpected keys
    path = root / "out" / "lora.safetensors"
    sd = load_file(path)
    full = load_model("tiny-random").transformer
    full.load_lora_adapter(str(path), adapter_name="subject", prefix="transformer")
    loaded = {n.replace(".subject.", ".") for n, _ in full.named_parameters() if ".lora_" in n}
    assert loaded == {k.removeprefix("transformer.") for k in sd}
    assert any(v.abs().max() > 0 for k, v in sd.items() if ".lora_B." in k)  # it trained


def test_a_changed_ort_checkpoint_is_refused(tiny_ort, photos, tmp_path, capsys):
    """The ORT checkpoint carries an integrity record (step, log and LoRA values): a value changed behind its
    back, or a NaN, is refused on resume with a typed error, and nothing is written."""
    from onnxruntime.training import api

    out = tmp_path / "out"
    argv = ["--backend", "ort", "--quiet"]
    assert (
        device_cli.main(["run", str(tiny_ort / "bundle"), "--images", str(photos), "-o", str(out), *argv])
        == 0
    )
    (out / "lora.safetensors").unlink()
    ckpt = out / "checkpoint" / "ort_checkpoint"
    name = Bundle(tiny_ort / "bundle").manifest["onnx"]["train"]["lora"][0]
    values = np.ascontiguousarray(
        api.CheckpointState.load_checkpoint(str(ckpt)).parameters[name].data, np.float32
    )
    data = ckpt.read_bytes()
    at = data.index(values.tobytes())  # the LoRA tensor's bytes inside ORT's file
    # (setting a value through ORT's Python API on a loaded checkpoint crashes ORT 1.19: change the bytes)
    for what, new in (
        ("an exponent bit", struct.pack("<I", struct.unpack_from("<I", data, at)[0] ^ 0x40000000)),
        ("a NaN", struct.pack("<f", float("nan"))),
    ):
        changed = tmp_path / what.replace(" ", "-")
        shutil.copytree(out, changed)
        (changed / "checkpoint" / "ort_checkpoint").write_bytes(data[:at] + new + data[at + 4 :])
        capsys.readouterr()
        rc = device_cli.main(
            ["train", str(tiny_ort / "bundle"), "--cache", str(out / "cache"), "-o", str(changed), *argv]
        )
        err = capsys.readouterr().err
        assert rc == 2 and "integrity record" in err and "Traceback" not in err, (what, err)
        assert not (changed / "lora.safetensors").exists()
    # the unchanged checkpoint resumes
    assert (
        device_cli.main(
            ["train", str(tiny_ort / "bundle"), "--cache", str(out / "cache"), "-o", str(out), *argv]
        )
        == 0
    )


def test_torch_backend_refuses_onnx_only_bundle(tiny_ort, photos, tmp_path, capsys):
    rc = device_cli.main(
        ["run", str(tiny_ort / "bundle"), "--images", str(photos), "-o", str(tmp_path / "o")]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--backend ort" in err and "Traceback" not in err


def test_ort_backend_refuses_torch_only_bundle(photos, tmp_path, capsys):
    export_bundle(
        load_model("tiny-random"),
        Plan(front_skip=1, back_skip=2, **PLAN),
        load_profile("desktop-cpu"),
        "a photo of sks cat",
        tmp_path / "bundle",
    )
    rc = device_cli.main(
        [
            "run",
            str(tmp_path / "bundle"),
            "--images",
            str(photos),
            "-o",
            str(tmp_path / "o"),
            "--backend",
            "ort",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "--format onnx" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtype", "bfloat16"], "float32"),
        (["--base-quant", "int8"], "--base-quant"),
        (["--optimizer", "adamw8bit"], "AdamW"),
        (["--span", "streamed", "--storage", "bfloat16"], "bfloat16"),
    ],
)
def test_onnx_format_refuses_what_it_cannot_train(tmp_path, capsys, args, message):
    rc = export_cli.main(
        [
            "--model",
            "tiny-random",
            "--profile",
            "desktop-cpu",
            "--prompt",
            "x",
            "-o",
            str(tmp_path / "b"),
            "-n",
            "1",
            "-m",
            "2",
            "--rank",
            "4",
            "--checkpointing",
            "off",
            "--format",
            "onnx",
            *args,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (tmp_path / "b").exists()


def test_unknown_format_is_refused(tmp_path, capsys):
    rc = export_cli.main(
        ["--model", "tiny-random", "--prompt", "x", "-o", str(tmp_path / "b"), "--format", "torch,tflite"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "tflite" in err and "torch, onnx" in err


def test_plain_onnxruntime_is_not_installed_beside_the_training_package():
    """Both own the onnxruntime/ folder: plain onnxruntime would silently break onnxruntime.training."""
    importlib.metadata.distribution("onnxruntime-training-cpu")
    with pytest.raises(importlib.metadata.PackageNotFoundError):
        importlib.metadata.distribution("onnxruntime")


def _weights_chain():
    """Four int8-stored layers (dequantised inside the graph, as the stream programs do): the traced
    program, its ONNX model, and inputs."""
    import torch

    from blockskip.export.onnx_export import to_onnx
    from blockskip.export.stream_export import trace
    from blockskip.runtime.backends.torch_stream import dequantise

    g = torch.Generator().manual_seed(0)
    ex = {"state.x": torch.randn(64, 256, generator=g)}
    for k in range(4):
        ex[f"w.l{k}.weight_q8"] = torch.randint(-127, 128, (256, 256), generator=g, dtype=torch.int8)
        ex[f"w.l{k}.weight_scale"] = torch.rand(256, generator=g) / 500

    def fn(t):
        x = t["state.x"]
        for k in range(4):
            x = torch.relu(x @ dequantise((t[f"w.l{k}.weight_q8"], t[f"w.l{k}.weight_scale"])).T)
        return {"out.x": x}

    traced = trace(fn, ex)
    names = [n for n, _, _ in traced.inputs]
    return to_onnx(traced.gm, traced.example_args(), names, ["out.x"]), {k: v.numpy() for k, v in ex.items()}


def _ort_order(proto, feed, tmp_path):
    """(outputs, [(op type, output bytes)] in the order ONNX Runtime ran the nodes)."""
    import onnx
    import onnxruntime as ort

    path = tmp_path / f"m{len(list(tmp_path.iterdir()))}.onnx"
    onnx.save(proto, str(path))
    o = ort.SessionOptions()
    o.log_severity_level = 3
    o.enable_profiling = True
    o.profile_file_prefix = str(tmp_path / "prof")
    s = ort.InferenceSession(str(path), o, providers=["CPUExecutionProvider"])
    out = s.run(None, feed)
    events = json.loads(open(s.end_profiling()).read())
    ran = [
        (e["args"]["op_name"], int(e["args"].get("output_size", 0)))
        for e in events
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")
    ]
    return out, ran


def test_deferred_weights_are_dequantised_next_to_their_matmul(tmp_path):
    """ONNX Runtime runs the nodes that read only graph inputs first: every weight dequantised to float32
    before the first matmul. With ``defer_weights`` each float32 weight appears only after the previous
    layer's matmul, and the outputs are unchanged."""
    from blockskip.export.onnx_export import defer_weights

    proto, feed = _weights_chain()
    ref, before = _ort_order(proto, feed, tmp_path)
    assert defer_weights(proto, lambda n: n.startswith("w.")) == 8  # each layer's int8 values and scales
    got, after = _ort_order(proto, feed, tmp_path)
    np.testing.assert_array_equal(got[0], ref[0])
    w32 = 256 * 256 * 4

    def weights_before_first_matmul(ran):
        first = next(k for k, (op, _) in enumerate(ran) if op in ("MatMul", "Gemm", "FusedMatMul"))
        return sum(1 for op, n in ran[:first] if n == w32 and op in ("Cast", "Mul"))

    assert weights_before_first_matmul(before) > 2  # ORT's own order: several float32 weights at once
    assert weights_before_first_matmul(after) <= 2  # the first layer's (its Cast and its scaled copy)


_PEAK_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
from blockskip.runtime.backends.ort import _session

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

sess = _session(sys.argv[1])
if sys.argv[2] == "reuse":  # the same options with ONNX Runtime's default buffer reuse
    opts = ort.SessionOptions()
    opts.enable_cpu_mem_arena = False
    opts.enable_mem_pattern = False
    sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
x = np.random.default_rng(0).standard_normal((2048, 1024)).astype(np.float32)
sess.run(None, {"x": x})
open("/proc/self/clear_refs", "w").write("5")
base = status("VmRSS")
out = sess.run(None, {"x": x})[0]
print((status("VmHWM") - base) / 2**20, float(out.sum()))
"""


def _dead_buffer_graph():
    """A value ``a`` (8 MiB) dead early, 32 MiB of other work, then a later value of a's size: ONNX Runtime's
    planner gives the later value a's buffer, which then stays allocated through the 32 MiB in between."""
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Mul", ["x", "x"], ["a"]),
        helper.make_node("ReduceSum", ["a"], ["s"], keepdims=1),
        helper.make_node("Concat", ["x", "x"], ["c"], axis=0),
        helper.make_node("Add", ["c", "s"], ["c2"]),
        helper.make_node("Mul", ["c2", "c2"], ["d"]),
        helper.make_node("ReduceSum", ["d"], ["e"], keepdims=1),
        helper.make_node("Mul", ["x", "e"], ["b"]),
        helper.make_node("Add", ["b", "x"], ["out"]),
    ]
    g = helper.make_graph(
        nodes,
        "dead_buffer",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2048, 1024])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2048, 1024])],
    )
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)


def test_stream_sessions_free_each_value_at_its_last_use(tmp_path):
    """The dry run counts a value until its last reader has run. ONNX Runtime's default planner holds a dead
    buffer until a later value of the same size takes it (a streamed VJP's attention scores through the
    whole backward); the stream sessions turn that reuse off. Peak RSS of one run, malloc returning memory
    (as ``bench.memory_accuracy`` measures): 32 MiB live at most, 40 MiB with ORT's reuse."""
    import os
    import subprocess
    import sys

    import onnx

    path = tmp_path / "dead_buffer.onnx"
    onnx.save(_dead_buffer_graph(), str(path))
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    peaks, sums = {}, {}
    for mode in ("ours", "reuse"):
        r = subprocess.run(
            [sys.executable, "-c", _PEAK_SCRIPT, str(path), mode],
            capture_output=True,
            text=True,
            env=env,
            check=True,
        )
        peaks[mode], sums[mode] = map(float, r.stdout.split()[-2:])
    assert sums["ours"] == sums["reuse"]
    assert 31.5 <= peaks["ours"] <= 34.0, peaks
    assert peaks["reuse"] >= peaks["ours"] + 7.5, peaks  # the graph does show ORT's held buffer
