"""Write a device bundle: split the DiT into per-block artifacts, prompt embeddings and the plan.

The bundle is assembled in a temporary sibling folder and moved into place only when complete, so a
failed export never leaves a half bundle or destroys an existing one.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from blockskip.export.families import LoadedModel, lora_target_names
from blockskip.runtime.backends.torch_families.base import tensor_names
from blockskip.runtime.backends.torch_families.latent import ENCODER_PREFIXES
from blockskip.runtime.bundle import SCHEMA_VERSION, file_record
from blockskip.runtime.errors import OutputError, PlanError
from blockskip.runtime.files import ensure_writable_dir
from blockskip.runtime.plan import Plan
from blockskip.runtime.profiles import Profile

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
            raise OutputError(f"{str(out)!r} exists and is not a bundle; choose an empty or new folder with -o")
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


def export_bundle(lm: LoadedModel, plan: Plan, profile: Profile, prompt: str, out: str | os.PathLike,
                  force: bool = False, formats=("torch",), log=None, delegate: str = "none") -> Path:
    """Write the bundle. ``formats``: any of "torch" (safetensors blocks for the torch backend), "onnx"
    (ONNX Runtime training artifacts + per-block inference models for the ort backend) and "pte"
    (ExecuTorch training program + per-block programs for the executorch backend and the native
    runner; ``delegate`` "xnnpack" lowers them to XNNPACK)."""
    out = Path(out)
    formats = check_formats(formats)
    log = log or (lambda msg: None)
    fam = lm.family
    trained = plan.validate(fam.num_blocks, lm.granularity, fam.valid_targets())
    lora = {"rank": plan.lora_rank, "alpha": plan.alpha,
            "targets": lora_target_names(fam, trained, plan.lora_targets)}
    check_output(out, force)
    if "onnx" in formats:
        from blockskip.export.onnx_export import check_plan

        check_plan(plan)
    if "pte" in formats:
        from blockskip.export.pte_export import check_plan as check_pte

        check_pte(plan, delegate)
    dtype = DTYPES[plan.dtype]
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        files: list[str] = []
        model = lm.transformer
        state = {n: t for n, t in list(model.named_parameters()) + list(model.named_buffers())}

        def part(prefixes):
            return {n: _cast(state[n], dtype) for n in tensor_names(model, prefixes)}

        # the torch backend reads every block it runs from safetensors; the onnx format carries its
        # own copies of the blocks, so an onnx-only bundle keeps only the small embed/head parts
        blocks = [_save(tmp, f"model/blocks/block_{i:03d}.safetensors", part([p]), files)
                  for i, p in enumerate(fam.block_paths())] if "torch" in formats else []
        embed = _save(tmp, "model/embed.safetensors", part(fam.embed_prefixes), files)
        head = _save(tmp, "model/head.safetensors", part(fam.head_prefixes), files)
        enc_state = {n: t for n, t in list(lm.encoder.named_parameters()) + list(lm.encoder.named_buffers())}
        enc_names = tensor_names(lm.encoder, ENCODER_PREFIXES[lm.encoder_spec["class"]])
        enc_file = _save(tmp, "encoder/encoder.safetensors", {n: enc_state[n].float() for n in enc_names}, files)
        text = lm.encode_prompt(prompt)
        onnx_section = None
        if "onnx" in formats:
            from blockskip.export.onnx_export import write_onnx

            onnx_section = write_onnx(tmp, lm, plan, trained, lora, {k: _cast(v, dtype) for k, v in text.items()},
                                      files, log)
        pte_section = None
        if "pte" in formats:
            from blockskip.export.pte_export import write_pte

            pte_section = write_pte(tmp, lm, plan, trained, lora, {k: _cast(v, dtype) for k, v in text.items()},
                                    files, delegate, log)
        prompt_file = _save(tmp, "text/prompt.safetensors", {k: _cast(v, dtype) for k, v in text.items()}, files)
        schedule = dict(num_samples=plan.num_samples, s_min=plan.s_min, s_max=plan.s_max,
                        granularity=lm.granularity, seed=plan.seed, patch_sampling=plan.patch_sampling,
                        shift=plan.timestep_shift)
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
            "model": {"config": {k: _jsonable(v) for k, v in fam.config.items()},
                      "blocks": blocks, "embed": embed, "head": head, "trained": trained,
                      "block_kinds": [fam.block_kind(i) for i in range(fam.num_blocks)]},
            "encoder": {**lm.encoder_spec, "file": enc_file},
            "lora": lora,
            "formats": formats,
            **({"onnx": onnx_section} if onnx_section else {}),
            **({"pte": pte_section} if pte_section else {}),
            "files": {rel: file_record(tmp, rel) for rel in files},
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=_jsonable))
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


def _cast(t: torch.Tensor, dtype) -> torch.Tensor:
    return t.to(dtype) if t.is_floating_point() else t


def _jsonable(v):
    if isinstance(v, tuple | set):
        return list(v)
    return v
