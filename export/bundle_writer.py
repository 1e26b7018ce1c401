"""The export pipeline: split the DiT into a device bundle (per-block weights in the plan's storage
layout, block-stream programs and other artifacts from each format plug-in, prompt embeddings, plan).

The bundle is assembled in a temporary sibling folder and moved into place only when complete, so a
failed export never leaves a half bundle or destroys an existing one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from blockskip.export.families import LoadedModel, lora_target_names
from blockskip.export.graphs import example_entry, initial_lora
from blockskip.export.stream_export import (
    EMBED,
    TEXT,
    WEIGHT,
    entry_io,
    stream_layout,
    trace_embed,
    trace_head,
    trace_shape,
)
from blockskip.runtime.backends import torch_stream as ts
from blockskip.runtime.backends.torch_families.base import tensor_names
from blockskip.runtime.backends.torch_families.latent import ENCODER_PREFIXES
from blockskip.runtime.backends.torch_io import tensor_at
from blockskip.runtime.backends.torch_lora import lora_metadata
from blockskip.runtime.bundle import SCHEMA_VERSION, file_record, write_manifest
from blockskip.runtime.errors import OutputError, PlanError
from blockskip.runtime.files import ensure_writable_dir
from blockskip.runtime.formats import seal_manifest
from blockskip.runtime.memory import return_freed_memory
from blockskip.runtime.plan import Plan
from blockskip.runtime.precompute import blocks_to_run
from blockskip.runtime.profiles import Profile
from blockskip.runtime.schedule import RNG as SCHEDULE_RNG
from blockskip.runtime.schema_check import problem

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _save(root: Path, rel: str, tensors: dict[str, torch.Tensor], files: list[str]) -> str:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(p))
    files.append(rel)
    return rel


def check_output(out: Path, force: bool) -> None:
    """Refuse an output that would lose data or cannot be written, before any work is done."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"{str(out)!r} exists and is a file; choose a new folder with -o")
    if out.exists() and any(out.iterdir()):
        if not (out / "manifest.json").is_file():
            raise OutputError(
                f"{str(out)!r} exists and is not a bundle; choose an empty or new folder with -o"
            )
        if not force:
            raise OutputError(f"bundle {str(out)!r} already exists; pass --force to replace it")
    ensure_writable_dir(out.parent if str(out.parent) else Path("."), "output parent folder")


FORMATS = ("torch", "onnx", "pte")


def check_formats(formats) -> list[str]:
    formats = list(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise PlanError(f"unknown --format {','.join(bad) or '(none)'}; choose from {', '.join(FORMATS)}")
    return formats


def plugins(formats, delegate: str = "none") -> list:
    """The program-format plug-ins (``onnx``, ``pte``) of a format list; ``torch`` needs none."""
    out: list = []
    for f in formats:
        if f == "onnx":
            from blockskip.export.onnx_export import OnnxFormat

            out.append(OnnxFormat())
        elif f == "pte":
            from blockskip.export.pte_export import PteFormat

            out.append(PteFormat(delegate))
    return out


def check_plan_for(plan: Plan, family: str, formats, delegate: str = "none") -> None:
    """Everything a format or the numerics refuse, before any work."""
    if plan.dtype == "float16" and family == "flux":
        raise PlanError(
            "FLUX overflows in float16 (its activations leave fp16's range and training turns to "
            "NaN); compute in bfloat16 or float32, and store weights in fewer bits with --storage"
        )
    if plan.span == "streamed" and "torch" in formats and plan.dtype != "float32":
        raise PlanError(
            f"--span streamed computes in float32; got --dtype {plan.dtype} (use --storage "
            f"{plan.dtype} to keep the frozen weights at that size)"
        )
    for pl in plugins(formats, delegate):
        pl.check(plan)


def export_bundle(
    lm: LoadedModel,
    plan: Plan,
    profile: Profile,
    prompt: str,
    out: str | os.PathLike,
    force: bool = False,
    formats=("torch",),
    log=None,
    delegate: str = "none",
    memory: dict | None = None,
) -> Path:
    """Write the bundle. ``formats``: any of "torch" (the torch backend runs the safetensors blocks),
    "onnx" (ONNX models for the ort backend) and "pte" (ExecuTorch programs for the executorch backend and
    the native runner; ``delegate`` "xnnpack" lowers them to XNNPACK). Every bundle holds the blocks it
    needs in the plan's storage layout and the block-stream section (which program each block runs);
    the program formats add the stream programs (precompute always streams its blocks), the photo
    encoder and, for a resident span, its training artifact. ``memory``: the dry run's predicted peaks
    (recorded for the device's memory check)."""
    out = Path(out)
    formats = check_formats(formats)
    log = log or (lambda msg: None)
    fam = lm.family
    trained = plan.validate(fam.num_blocks, lm.granularity, fam.valid_targets())
    lora: dict[str, Any] = {
        "rank": plan.lora_rank,
        "alpha": plan.alpha,
        "targets": lora_target_names(fam, trained, plan.lora_targets),
    }
    lora["metadata"] = lora_metadata(lora)
    check_output(out, force)
    check_plan_for(plan, fam.name, formats, delegate)
    fmts = plugins(formats, delegate)
    dtype = DTYPES[plan.dtype]
    storage = plan.storage_dtype
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files: list[str] = []
        # every transformer tensor comes through the store, one part at a time: an in-memory model's shared
        # tensors, or a folder's shards read as each part is written (one block of the model in memory)
        store = lm.store()
        model = store.model

        def part(name):
            names = store.load_part(name)
            out = {n: _cast(tensor_at(model, n).detach(), dtype) for n in names}
            store.free(names)
            return out

        stop = blocks_to_run(trained, fam.num_blocks, plan.back_residual)
        layout = stream_layout(fam, trained, lora["targets"], stop)
        paths = fam.block_paths()
        needed = sorted(set(range(stop)) | set(trained))
        log(f"blocks: {len(needed)} of {fam.num_blocks} in {storage}")
        blocks: list[str | None] = [None] * fam.num_blocks
        # the storage conversion casts each tensor itself: a folder's blocks are read as stored (bfloat16)
        raw = lm.store(as_stored=True)
        for done, i in enumerate(needed, 1):
            names = raw.load_block(i)
            stored = ts.store_tensors(raw.model.get_submodule(paths[i]), storage)
            raw.free(names)  # before the save, which copies the stored tensors once more
            blocks[i] = _save(
                tmp,
                f"model/blocks/block_{i:03d}.safetensors",
                {f"{paths[i]}.{k}": v for k, v in stored.items()},
                files,
            )
            del stored
            return_freed_memory()
            log(f"blocks: {done}/{len(needed)} written (block {i})")
        log("embed, head, photo encoder and prompt")
        embed_tensors = part("embed")
        embed = _save(tmp, "model/embed.safetensors", embed_tensors, files)
        names = store.load_part("head")
        head = _save(tmp, "model/head.safetensors", ts.store_tensors(_head_view(fam, model), storage), files)
        store.free(names)
        enc_state = {n: t for n, t in list(lm.encoder.named_parameters()) + list(lm.encoder.named_buffers())}
        enc_names = tensor_names(lm.encoder, ENCODER_PREFIXES[lm.encoder_spec["class"]])
        enc_file = _save(
            tmp, "encoder/encoder.safetensors", {n: enc_state[n].float() for n in enc_names}, files
        )
        text = {k: _cast(v, dtype) for k, v in lm.encode_prompt(prompt).items()}
        log("initial LoRA")
        init = initial_lora(lm, trained, lora, plan.seed)
        return_freed_memory()  # peft's layers, dropped: the LoRA's size again
        lora_init = _save(tmp, "model/lora_init.safetensors", init, files)
        log("example cache entry")
        # the stream programs need only the entry's shapes; a resident span's training program is traced on it
        entry = example_entry(lm, plan, trained, text, fake=plan.span == "streamed" or not fmts)
        stream = stream_section(tmp, lm, plan, layout, lora, entry, fmts, files, log)
        stream.update(lora_init=lora_init, block_paths=paths)
        if fmts:  # the program runtimes build each sample and its block-0 input with the embed program
            stream["shapes"][EMBED] = embed_section(tmp, lm, plan, embed_tensors, text, fmts, files, log)
        sections = {pl.name: pl.section() for pl in fmts}
        for pl in fmts:
            if plan.span == "resident":
                sections[pl.name].update(pl.resident_span(tmp, lm, plan, trained, lora, entry, files, log))
            log(f"{pl.name}: photo encoder")
            sections[pl.name]["encoder"] = pl.encoder(tmp, lm, plan, files)
        prompt_file = _save(tmp, "text/prompt.safetensors", text, files)
        schedule = dict(
            num_samples=plan.num_samples,
            s_min=plan.s_min,
            s_max=plan.s_max,
            granularity=lm.granularity,
            seed=plan.seed,
            patch_sampling=plan.patch_sampling,
            shift=plan.timestep_shift,
            rng=SCHEDULE_RNG,
        )
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "family": fam.name,
            "source_model": lm.name,
            "profile": profile.raw,
            "prompt": prompt_file,
            "prompt_text": prompt,
            "plan": plan.to_dict(),
            "schedule": schedule,
            "vae_factor": lm.vae_factor,
            "model": {
                "config": {k: _jsonable(v) for k, v in fam.config.items()},
                "blocks": blocks,
                "embed": embed,
                "head": head,
                "trained": trained,
                "block_kinds": [fam.block_kind(i) for i in range(fam.num_blocks)],
            },
            "encoder": {**lm.encoder_spec, "file": enc_file},
            "lora": lora,
            "formats": formats,
            "stream": stream,
            **sections,
            **({"memory": memory} if memory else {}),
            "files": {rel: file_record(tmp, rel) for rel in files},
        }
        manifest = json.loads(json.dumps(manifest, default=_jsonable))
        bad = problem("manifest", seal_manifest(manifest))
        if bad:  # the exporter's own mistake: never write a bundle the device would refuse
            raise RuntimeError(f"the manifest breaks its declared format: {bad}")
        write_manifest(tmp / "manifest.json", manifest)
        if out.exists():
            old = out.with_name(f".{out.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _head_view(fam, model) -> torch.nn.Module:
    """The head's modules and parameters under their model names (sharing the model's tensors)."""
    from blockskip.export.graphs import graft

    m = torch.nn.Module()
    for path in fam.head_prefixes:
        graft(m, model, path)
    return m


def stream_section(
    root: Path, lm, plan: Plan, layout, lora: dict, entry: dict | None, fmts, files: list[str], log
) -> dict:
    """The manifest's ``stream`` section; each shape's programs traced once (their calling convention is
    what every block backend feeds, the torch one too) and lowered by every program plug-in
    (``stream/<shape>.<role>.<ext>``). Traced on fake tensors: the lowering needs only the graph (a real
    trace runs it on zeros: a FLUX.1-dev single block's VJP at 768 tokens, about 3 GB)."""
    fam = lm.family
    skeleton = fam.skeleton()
    storage = plan.storage_dtype
    streamed = plan.span == "streamed"  # a resident span's bundle needs only precompute's forward programs
    shapes: dict = {}
    entry_shapes = {k: (tuple(v.shape), torch.float32) for k, v in (entry or {}).items()}
    for sid, shape in layout.shapes.items():
        rec = {
            "kind": shape.kind,
            "targets": shape.targets,
            "example_block": shape.example_block,
            "programs": {},
        }
        if fmts or streamed:
            state, consts, _ = entry_io(entry_shapes)
            log(f"stream: tracing {sid} ({len(shape.blocks)} blocks)")
            for role, traced in trace_shape(
                fam, skeleton, shape, storage, lora, state, consts, fake=True, vjp=streamed
            ).items():
                rec["programs"][role] = _lower_all(traced, root, f"stream/{sid}.{role}", fmts, files, log)
        shapes[sid] = rec
    head: dict[str, Any] = {"kind": "head", "targets": [], "programs": {}}
    if streamed:
        state, consts, target = entry_io(entry_shapes)
        traced = trace_head(fam, skeleton, storage, state["hidden"], consts, target, fake=True)
        head["programs"]["head"] = _lower_all(traced, root, "stream/head.head", fmts, files, log)
    shapes["head"] = head
    return {
        "storage": storage,
        "shapes": shapes,
        "train": [[i, s] for i, s in layout.train],
        "precompute": [[i, s] for i, s in layout.precompute],
    }


def embed_section(root: Path, lm, plan: Plan, weights: dict, text: dict, fmts, files: list[str], log) -> dict:
    """The embed program (``stream/embed.embed.<ext>``), traced on the model's own embed weights."""
    fam = lm.family
    log("stream: tracing the embed program")
    w = {n: t.float() for n, t in weights.items()}
    p = {n: t.float() for n, t in text.items()}
    traced = trace_embed(
        fam,
        fam.skeleton(),
        {n: (tuple(t.shape), t.dtype) for n, t in w.items()},
        {n: (tuple(t.shape), t.dtype) for n, t in p.items()},
        lm.latent_channels,
        plan,
        lm.vae_factor,
        example={**{WEIGHT + n: t for n, t in w.items()}, **{TEXT + n: t for n, t in p.items()}},
    )
    return {
        "kind": EMBED,
        "targets": [],
        "programs": {EMBED: _lower_all(traced, root, f"stream/{EMBED}.{EMBED}", fmts, files, log)},
    }


def _lower_all(traced, root: Path, rel: str, fmts, files: list[str], log) -> dict:
    rec = traced.io()
    for pl in fmts:
        log(f"{pl.name}: {rel}")
        rec[pl.name] = pl.program(traced, root, rel, files)
        return_freed_memory()  # a lowering's temporaries (a real-size block's: GBs) go back to the system
    return rec


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _jsonable(v):
    if isinstance(v, tuple | set):
        return list(v)
    return v
