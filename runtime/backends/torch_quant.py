"""Frozen base weights of the trained span in 8 or 4 bits; LoRA goes on top (QLoRA-style).

``quantize_frozen`` swaps every ``nn.Linear`` inside the trained blocks (attention, MLP and adaLN
linears; LoRA targets included) for a quantised frozen linear, in place. peft's
``inject_adapter_in_model`` then wraps the quantised modules under the same names, so the LoRA names,
the saved adapter and everything downstream are unchanged. The head (final norm + projection) and the
LoRA weights stay in the plan dtype.

Two libraries, picked by where the weights live (``backend=None``):

- **optimum-quanto** (CPU, ARM, anything but CUDA): ``int8`` is ``qint8`` (symmetric, one scale per
  output row): int8 data + one scale per row, about 1/4 of fp32. ``nf4`` is ``qint4``, which is **not
  NF4**: it is affine (asymmetric) int4 on a uniform grid with a scale and a shift per group of up to 128
  input features (per output row when ``in_features`` does not split into groups of 32..128), packed
  two values a byte: about 1/7 of fp32 with fp32 scales. quanto has no NF4 (normal-float) code book;
  the name follows the plan's "4-bit class" meaning. Its CPU int4 unpack kernel is a C++ extension that
  quanto compiles on first use (needs a C++ compiler and ninja on the device).
- **bitsandbytes** (weights on CUDA): ``Linear8bitLt`` (LLM.int8, int8 row-major + per-row scales) and
  ``Linear4bit`` with ``quant_type="nf4"`` (real NF4, one absmax per 64 values). peft uses its
  bitsandbytes LoRA wrappers only when the model says ``is_loaded_in_8bit`` / ``is_loaded_in_4bit``, so
  those flags are set here.

Both are imported lazily; a missing one raises a ``BlockSkipError`` that says what to install. The
memory dry run runs the quanto path on fake tensors (it works unchanged there).
"""

from __future__ import annotations

import contextlib
from typing import Any, cast

import torch
from torch import nn

from blockskip.runtime.errors import BlockSkipError
from blockskip.runtime.plan import BASE_QUANT as MODES

BACKENDS = ("quanto", "bnb")
INSTALL = "pip install 'dit-blockskip[quant]'"


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _is_quantised(m: nn.Module) -> bool:
    return type(m).__module__.startswith(("optimum.quanto", "bitsandbytes"))


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


def _no_modes() -> contextlib.AbstractContextManager[object]:
    """Imports must create their module-level tensors outside any fake / tracing mode (the dry run
    calls us under FakeTensorMode; a fake constant table cached in a module would outlive it)."""
    from torch.utils._python_dispatch import _disable_current_modes

    return _disable_current_modes()


def _import_quanto() -> tuple[Any, Any]:  # (optimum.quanto, its quantize_module)
    try:
        with _no_modes():
            import optimum.quanto as quanto
            from optimum.quanto.nn import quantize_module

            # imported lazily by quanto at the first quantisation; each builds constant tensors
            from optimum.quanto.tensor.weights import awq, marlin, tinygemm  # noqa: F401
    except ImportError as e:
        raise BlockSkipError(f"base_quant needs optimum-quanto on this device ({e}): {INSTALL}") from e
    return quanto, quantize_module


def _import_bnb() -> Any:  # the bitsandbytes module
    try:
        with _no_modes():
            import bitsandbytes as bnb
    except ImportError as e:
        raise BlockSkipError(f"base_quant on CUDA needs bitsandbytes ({e}): {INSTALL}") from e
    return bnb


def default_backend(weight: torch.Tensor) -> str:
    """bitsandbytes for weights on a CUDA device (its kernels are CUDA-first), quanto elsewhere."""
    return "bnb" if weight.device.type == "cuda" and torch.cuda.is_available() else "quanto"


def quantize_frozen(
    model: nn.Module, prefixes: list[str], mode: str, lora_targets: list[str], backend: str | None = None
) -> dict[str, str]:
    """Quantise the frozen ``nn.Linear`` weights under the block ``prefixes`` (e.g.
    ``"transformer_blocks.3"``) in place; return ``{module name: quantised class}``.

    Only materialised linears are touched (skipped blocks stay on the meta device); biases stay as they
    are. Call it before LoRA is injected: peft then wraps the quantised linears (quanto ``QLinear`` with
    its generic ``lora.Linear``, bitsandbytes with ``lora.bnb.Linear8bitLt`` / ``Linear4bit``). Every
    ``nn.Linear`` LoRA target under ``prefixes`` is checked to be quantised.
    """
    if mode not in MODES:
        raise BlockSkipError(f"base_quant must be one of {', '.join(MODES)} (got {mode!r})")
    if mode == "none":
        return {}
    names = [
        n
        for n, m in model.named_modules()
        if _under(n, prefixes)
        and isinstance(m, nn.Linear)
        and not _is_quantised(m)
        and m.weight is not None
        and m.weight.device.type != "meta"
    ]
    if not names:
        return {}
    backend = backend or default_backend(cast(nn.Linear, model.get_submodule(names[0])).weight)
    if backend == "quanto":
        _quanto(model, names, mode)
    elif backend == "bnb":
        _bnb(model, names, mode)
    else:
        raise BlockSkipError(f"unknown quantisation backend {backend!r}; valid: {', '.join(BACKENDS)}")
    modules = dict(model.named_modules())
    done = {n: type(modules[n]).__name__ for n in names}
    missed = [
        t
        for t in lora_targets
        if _under(t, prefixes) and isinstance(modules.get(t), nn.Linear) and not _is_quantised(modules[t])
    ]
    if missed:
        raise BlockSkipError(f"LoRA target(s) {missed} were left unquantised (not materialised?)")
    return done


def _quanto(model: nn.Module, names: list[str], mode: str) -> None:
    quanto, quantize_module = _import_quanto()
    qtype = quanto.qint8 if mode == "int8" else quanto.qint4
    for name in names:
        lin = model.get_submodule(name)
        q = quantize_module(lin, weights=qtype)  # QLinear sharing lin's weight and bias
        with torch.no_grad():
            _freeze(q)  # weight -> int8 / packed int4 data + scales; the float weight is dropped
        # quanto wraps the frozen QTensor in a Parameter that requires grad; the base must not train
        q.weight.requires_grad_(False)
        if q.bias is not None:
            q.bias.requires_grad_(False)
        _set_module(model, name, q)  # replaced through its parent: quanto on a bare Linear loses weight
        del lin, q


def _freeze(q: Any) -> None:  # a quanto QLinear
    """``q.freeze()``, also on fake tensors (the memory dry run).

    quanto decides two things by ``type(data) is torch.Tensor``, which a FakeTensor is not: whether to
    pack int4 values two to a byte, and (bf16, groups of 128, CPU) whether to use its tinygemm layout,
    which then asserts. So for 4-bit on fake tensors we build the kernel-agnostic tensor quanto would
    build (the same quantiser, scales and shifts; ``optimized=False``) and pack its data as quanto does
    for real tensors. Same shapes and dtypes, hence the same bytes: the tinygemm layout holds the same
    packed uint8 data and the same scales and shifts, stored together. qint8 needs no help.
    """
    from torch._subclasses.fake_tensor import is_fake

    if q.weight_qtype.bits == 8 or not is_fake(q.weight):
        q.freeze()
        return
    from optimum.quanto.tensor import quantize_weight
    from optimum.quanto.tensor.packed import PackedTensor

    qt, group = q.weight_qtype, q.weight_group_size
    scale, shift = q.optimizer(q.weight, qtype=qt, axis=0, group_size=group)
    w = quantize_weight(
        q.weight, qtype=qt, axis=0, scale=scale, shift=shift, group_size=group, optimized=False
    )
    if not isinstance(w._data, PackedTensor):
        w._data = PackedTensor.pack(w._data, qt.bits)
    q.weight = nn.Parameter(w, requires_grad=False)


def _bnb(model: nn.Module, names: list[str], mode: str) -> None:
    bnb = _import_bnb()
    for name in names:
        lin = model.get_submodule(name)
        w, has_bias = lin.weight, lin.bias is not None
        if mode == "int8":
            q = bnb.nn.Linear8bitLt(
                lin.in_features,
                lin.out_features,
                bias=has_bias,
                has_fp16_weights=False,
                threshold=6.0,
                device="meta",
            )
            q.weight = bnb.nn.Int8Params(w.data, requires_grad=False, has_fp16_weights=False)
        else:
            q = bnb.nn.Linear4bit(
                lin.in_features,
                lin.out_features,
                bias=has_bias,
                compute_dtype=w.dtype,
                quant_type="nf4",
                device="meta",
            )
            q.weight = bnb.nn.Params4bit(w.data, requires_grad=False, quant_type="nf4", module=q)
        if has_bias:
            q.bias = lin.bias
        q = q.to(w.device)  # bitsandbytes quantises on the move to a real device
        _set_module(model, name, q)
        del lin, w, q
    # peft picks its bitsandbytes LoRA wrappers only when the model carries these flags
    if mode == "int8":
        model.is_loaded_in_8bit = True  # type: ignore[assignment]
    else:
        model.is_loaded_in_4bit = True  # type: ignore[assignment]
