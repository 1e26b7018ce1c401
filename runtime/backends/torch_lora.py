"""LoRA on the skeleton with peft; the LoRA metadata; the shared checkpoint from a peft model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from blockskip.runtime.checkpoint import read_checkpoint, write_checkpoint
from blockskip.runtime.errors import BlockSkipError

ADAPTER = "default"


def lora_config(lora: dict[str, Any]) -> Any:  # a peft LoraConfig
    from peft import LoraConfig

    return LoraConfig(
        r=lora["rank"], lora_alpha=lora["alpha"], target_modules=list(lora["targets"]), init_lora_weights=True
    )


def inject_lora(model: torch.nn.Module, lora: dict[str, Any]) -> None:
    """Add LoRA (A: kaiming, B: zero, from the current torch seed) to the full module names listed."""
    from peft import inject_adapter_in_model

    inject_adapter_in_model(lora_config(lora), model, adapter_name=ADAPTER)
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_" in n)


def lora_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_" in n]


def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """peft names -> diffusers names: ``transformer.<module>.lora_A.weight``."""
    return diffusers_names({n: p for n, p in model.named_parameters() if ".lora_" in n})


def diffusers_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "transformer." + n.replace(f".{ADAPTER}.", "."): t.detach().contiguous().clone()
        for n, t in tensors.items()
    }


def lora_metadata(lora: dict[str, Any]) -> dict[str, str]:
    """The safetensors metadata of a saved LoRA (peft's config with alpha = rank: the scale is folded)."""
    cfg = lora_config({**lora, "alpha": lora["rank"]}).to_dict()
    cfg = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.items()}
    return {
        "format": "pt",
        "lora_adapter_metadata": json.dumps(
            {f"transformer.{k}": v for k, v in cfg.items()}, sort_keys=True, default=str
        ),
    }


def checkpoint_tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Copies of the LoRA weights and optimizer state (what a checkpoint holds)."""
    tensors = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        n = names[id(p)]
        for k, v in st.items():
            t = torch.as_tensor(v).detach().clone()
            tensors[f"opt.{k}.{n}"] = t.reshape(-1) if t.dim() == 0 else t
    for n, p in model.named_parameters():
        if ".lora_" in n:
            tensors[f"param.{n}"] = p.detach().clone()
    return tensors


def save_checkpoint(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int, log: dict[str, Any]
) -> None:
    """The shared checkpoint (``runtime.checkpoint``), from a peft model and its torch optimizer."""
    write_checkpoint(path, checkpoint_tensors(model, opt), step, log)


def restore_checkpoint(
    path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer
) -> tuple[int, dict[str, Any]]:
    """Restore LoRA weights and optimizer state; return (step, saved log)."""
    _, step, saved = read_checkpoint(path)  # the declared format, the integrity record, finite values
    tensors = load_file(path)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, v in tensors.items():
            if k.startswith("param."):
                if k[6:] not in params or params[k[6:]].shape != v.shape:
                    raise BlockSkipError(
                        f"checkpoint {path} does not belong to this bundle's plan; use another -o"
                    )
                params[k[6:]].copy_(v)
    for n, p in params.items():
        if ".lora_" not in n:
            continue
        st = {}
        for key, t in tensors.items():
            if key.startswith("opt.") and key.endswith("." + n) and key[4 : -len(n) - 1].isidentifier():
                k = key[4 : -len(n) - 1]
                if k == "step":  # torch's AdamW keeps a 0-d tensor, bitsandbytes a Python int
                    st[k] = (
                        t.reshape(()).clone() if isinstance(opt, torch.optim.AdamW) else int(t.reshape(-1)[0])
                    )
                else:
                    st[k] = t.clone()
        if st:
            opt.state[p] = st
    return step, saved
