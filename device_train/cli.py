"""``device-train``: precompute the frozen segments for your photos, then train the LoRA on device."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from blockskip.runtime.cli_util import run_cli
from blockskip.runtime.formats import PHOTO_MIN_SIDE, TRAIN_LOG
from blockskip.runtime.lora_layouts import FAMILIES, FORMATS

if TYPE_CHECKING:
    from blockskip.runtime.events import EventLog

EPILOG = """examples:
  device-train run bundle --images photos/ -o out          # precompute + train, resumable
  device-train precompute bundle --images photos/ --cache out/cache
  device-train train bundle --cache out/cache -o out --lora-format all
  device-train convert-lora out/lora.safetensors --family flux --format kohya -o out/lora_kohya.safetensors
Your photos never leave the device: only the bundle comes from the desktop."""


#: allocations of this size or more get their own mapping, returned to the system when freed
TRAINING_MMAP_THRESHOLD = 64 << 10


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="device-train",
        description="Precompute the frozen segments for your photos, then train the LoRA on the device.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(
        sp: argparse.ArgumentParser, images: bool = False, out: bool = False, cache: bool = False
    ) -> argparse.ArgumentParser:
        sp.add_argument("bundle", help="bundle folder written by blockskip-export")
        if images:
            sp.add_argument(
                "--images",
                required=True,
                help=f"folder of subject photos (PNG, JPEG or BMP; at least {PHOTO_MIN_SIDE} px)",
            )
        if out:
            sp.add_argument("-o", "--output", required=True, help="output folder (LoRA, log, checkpoint)")
        sp.add_argument(
            "--cache",
            default=None if not cache else None,
            help="residual cache folder (default: OUTPUT/cache)",
        )
        sp.add_argument(
            "--backend",
            default="torch",
            help="runtime backend: torch, ort (ONNX Runtime training; needs a bundle "
            "exported with --format onnx) or executorch (ExecuTorch training program; needs "
            "a bundle exported with --format pte). torch and executorch share the "
            "checkpoint, so either resumes the other's run",
        )
        sp.add_argument("--quiet", action="store_true", help="no progress bars")
        sp.add_argument(
            "--events",
            metavar="FILE",
            default=None,
            help="write the run's events as JSON lines to FILE ('-': stdout, and the messages go "
            "to stderr): phases, precompute progress, steps (loss, seconds, peak RSS, ETA), "
            "checkpoints, errors and the outputs (docs/events.md)",
        )
        sp.add_argument("--debug", action="store_true", help="show tracebacks")
        return sp

    def lora_format(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--lora-format",
            default="diffusers",
            choices=(*FORMATS, "all"),
            help="LoRA layouts to write: diffusers (OUT/lora.safetensors, always written), kohya "
            "(lora_unet_* keys with .alpha: OUT/lora_kohya.safetensors), comfy (the original "
            "checkpoint's names, as ComfyUI loads them: OUT/lora_comfy.safetensors) or all",
        )
        return sp

    lora_format(
        common(
            sub.add_parser(
                "run",
                help="precompute then train (resumes where it stopped)",
                epilog=EPILOG,
                formatter_class=argparse.RawDescriptionHelpFormatter,
            ),
            images=True,
            out=True,
        )
    )
    common(sub.add_parser("precompute", help="encode photos and precompute the frozen segments"), images=True)
    lora_format(common(sub.add_parser("train", help="train the LoRA from a finished cache"), out=True))
    cv = sub.add_parser(
        "convert-lora", help="write a LoRA (diffusers naming, as device-train writes it) in another layout"
    )
    cv.add_argument("lora", help="LoRA safetensors written by device-train (or the native runner)")
    cv.add_argument(
        "--family", required=True, choices=FAMILIES, help="model family of the bundle it was trained on"
    )
    cv.add_argument(
        "--format", required=True, choices=[f for f in FORMATS if f != "diffusers"], help="layout to write"
    )
    cv.add_argument("-o", "--output", required=True, help="output safetensors file")
    cv.add_argument("--debug", action="store_true", help="show tracebacks")
    a = p.parse_args(argv)
    if a.cmd == "convert-lora":
        return run_cli(lambda: _convert(a), a.debug, "device-train")

    events: EventLog | None = None

    def go_with_events() -> None:
        from blockskip.runtime.errors import BlockSkipError
        from blockskip.runtime.events import EventLog

        nonlocal events
        if a.events is None:
            return go()
        events = EventLog(a.events)
        try:
            return go()
        except BlockSkipError as e:
            events.emit("error", kind=type(e).__name__, message=str(e))
            raise
        except KeyboardInterrupt:
            events.emit("error", kind="interrupted", message="stopped by the user")
            raise
        except Exception as e:
            events.emit("error", kind="internal", message=f"{type(e).__name__}: {e}")
            raise
        finally:
            events.close()

    def say(msg: str) -> None:
        print(msg, file=sys.stderr if a.events == "-" else sys.stdout)

    def go() -> None:
        from blockskip.device_train.app import default_cache, run_precompute, run_train
        from blockskip.runtime.errors import BlockSkipError
        from blockskip.runtime.memory import map_large_allocations

        # what a phase frees goes back to the system (glibc's rising mmap threshold kept freed tensors of
        # up to 32 MiB in the heap): the process's peak is its live tensors', as the plan predicts. From
        # 64 KiB: with 1 MiB the heap kept 714 MiB of freed smaller tensors at SD3.5-medium's training peak
        # (4253 MiB against 4039 with 64 KiB; the live tensors 3462); SANA-1.6B's step time the same (14 s)
        map_large_allocations(TRAINING_MMAP_THRESHOLD)

        cache = a.cache
        if cache is None:
            if a.cmd == "precompute":
                raise BlockSkipError("precompute needs --cache FOLDER")
            cache = default_cache(a.output)
        outputs = {"cache": str(cache)}
        if a.cmd in ("run", "precompute"):
            run_precompute(
                a.bundle,
                a.images,
                cache,
                a.backend,
                a.quiet,
                out_dir=a.output if a.cmd == "run" else None,
                events=events,
            )
        if a.cmd in ("run", "train"):
            log = run_train(
                a.bundle, cache, a.output, a.backend, a.quiet, lora_format=a.lora_format, events=events
            )
            files = log.get("lora_files", {})
            extra = "".join(f", {f}: {path}" for f, path in files.items() if f != "diffusers")
            outputs.update({("lora" if f == "diffusers" else f"lora_{f}"): path for f, path in files.items()})
            outputs["train_log"] = str(Path(a.output) / TRAIN_LOG)
            say(
                f"LoRA written to {log['lora']}{extra}  (final loss {log['losses'][-1]:.4f}, "
                f"peak RSS {log['peak_rss_mib']:.0f} MiB; log {a.output}/train_log.json)"
            )
        else:
            say(f"cache ready in {cache}")
        if events is not None:
            events.emit("done", outputs=outputs)

    return run_cli(go_with_events, a.debug, "device-train")


def _convert(a: argparse.Namespace) -> None:
    from blockskip.runtime.errors import BlockSkipError
    from blockskip.runtime.lora_layouts import convert_file

    if not Path(a.lora).is_file():
        raise BlockSkipError(f"LoRA file {a.lora!r} not found")
    convert_file(a.lora, a.output, a.family, a.format)
    print(f"{a.format} LoRA written to {a.output}")


if __name__ == "__main__":
    sys.exit(main())
