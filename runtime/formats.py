"""Every on-disk format, declared once: the names the readers and writers use, a typed declaration of
each JSON document, and a JSON Schema (draft 2020-12) of each, derived from those declarations.

The formats (``docs/formats.md`` says what each key means and who writes and reads it):

* ``manifest``: ``BUNDLE/manifest.json``, what the exporter wrote (:class:`Manifest`);
* ``cache_index``: ``CACHE/index.json``, the realised schedule, the cache's identity, a sha256 per shard;
* ``cache_entry``: ``CACHE/entry_<k>.safetensors``, one schedule entry's tensors (``in.``, ``c.``,
  ``delta.``, ``target``); the schema is of the safetensors header;
* ``checkpoint``: ``OUT/checkpoint/checkpoint.safetensors``, the LoRA (``param.``), the optimizer state
  (``opt.<state>.``) and metadata ``step`` and ``log``;
* ``optimizer``: the AdamW hyper-parameters of a training program (``pte.train.optimizer``,
  ``onnx.train.optimizer``); the per-parameter state (:class:`AdamWState`) lives in the checkpoint;
* ``train_log``: ``OUT/train_log.json``, and the checkpoint's ``log`` metadata;
* ``lora``: ``OUT/lora.safetensors``, diffusers-named LoRA tensors and peft's metadata;
* ``event``: one line of a run's ``--events`` file (JSON lines: phases, progress, steps, errors, outputs).

``python -m blockskip.runtime.formats --write docs/schemas`` writes ``<kind>.schema.json`` for each and
``device_train/native/formats.h`` (the shared names as C++ constants); ``--check`` says whether the
written files are up to date. :func:`validate` checks a document against its schema with the
``jsonschema`` package (tests only: the runtime never needs it). Imports no more than numpy.
"""

import argparse
import dataclasses
import hashlib
import json
import struct
import sys
import types
import typing
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired, Required, TypedDict, TypeVar, overload

import numpy as np

from blockskip.runtime import plan as _plan
from blockskip.runtime.schedule import RNG, ScheduleEntry
from blockskip.runtime.tensorfile import DTYPES

# ------------------------------------------------------------------------------------------------
# Names (the C++ runner gets the same ones from device_train/native/formats.h)

# files
MANIFEST = "manifest.json"  # the bundle's manifest
SCHEMA_VERSION = 2  # manifest.json's schema_version (2: the manifest carries its integrity record)
MANIFEST_SHA256 = (
    "canonical_sha256"  # manifest.json: sha256 of the canonical form of the rest (manifest_digest)
)
CACHE_INDEX = "index.json"  # the cache's index
SHARD_PREFIX, SHARD_DIGITS, SHARD_SUFFIX = "entry_", 5, ".safetensors"  # shard k: entry_00007.safetensors
CHECKPOINT_DIR = "checkpoint"  # OUT/checkpoint/
CHECKPOINT = "checkpoint.safetensors"  # the shared checkpoint in it
LORA_FILE = "lora.safetensors"  # OUT/lora.safetensors
TRAIN_LOG = "train_log.json"  # OUT/train_log.json
LOCK_FILE = ".blockskip.lock"  # OUT/ and CACHE/: the run's advisory lock (flock), the holder's pid in it
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"  # an atomic write's temporary beside NAME: .NAME.<random>.tmp

# Canonical safetensors files (the LoRA, the checkpoint, cache shards; runtime/tensorfile.py write_tensors,
# device_train/native/safetensors.cpp): the header is json.dumps(header, sort_keys=True,
# separators=(",", ":")) (every object's keys sorted, no spaces, ASCII with other characters escaped),
# ``__metadata__`` only when there is metadata, the tensors' data in name order, the header padded with
# spaces to a multiple of 8 bytes; so the same tensors and metadata are the same bytes.

# file records (manifest "files", cache index "entries") and program records
RECORD_FILE, RECORD_SHA256, RECORD_SIZE = "file", "sha256", "size"

# the cache index
INDEX_SOURCE, INDEX_SOURCE_SHA256, INDEX_SCHEDULE, INDEX_ENTRIES = (
    "source",
    "source_sha256",
    "schedule",
    "entries",
)
INDEX_MAX_RESIDENT_BLOCKS, INDEX_PEAK_RSS_MIB = (
    "max_resident_blocks",
    "peak_rss_mib",
)  # precompute's, optional
INDEX_START_RSS_MIB = "start_rss_mib"  # optional: the runner's RSS before precompute (native)
SOURCE_BUNDLE, SOURCE_IMAGES = "bundle", "images"  # index source: manifest sha256, {photo name: sha256}
SCHEDULE_META, SCHEDULE_ENTRIES = "meta", "entries"  # index schedule: parameters, one record per entry

# a cache entry's tensors
ENTRY_IN = "in."  # in.<state>: the state entering the first trained block
ENTRY_CONST = "c."  # c.<const>: the entry's constants (timestep embedding, positions ...)
ENTRY_DELTA = "delta."  # delta.<block>.<state>: residual of the skipped span that starts at <block>
ENTRY_TARGET = "target"  # the flow-matching target, in the head's output layout
STATE_HIDDEN = "hidden"  # the state the head reads

# the calling convention of the block-stream programs (manifest stream.shapes.<id>.programs.<role>)
STATE, CONST, GRAD, WEIGHT, LORA = "state.", "c.", "grad.", "w.", "lora."  # inputs
OUT, GRAD_IN, LORA_GRAD = "out.", "grad_in.", "lora_grad."  # outputs
LOSS, LOSS_SCALE = "loss", "loss_scale"
EMBED = (
    "embed"  # the embed program's shape id and role (precompute: a schedule entry's crop -> block 0's input)
)
TEXT = "text."  # its prompt-embedding inputs (the bundle's prompt file)

# the checkpoint
PARAM = "param."  # param.<peft name>: a LoRA tensor
OPT = "opt."  # opt.<state>.<peft name>: its optimizer state
ADAM_STEP, ADAM_EXP_AVG, ADAM_EXP_AVG_SQ = "step", "exp_avg", "exp_avg_sq"  # AdamW's state (torch's names)
ADAMW_STATE = (ADAM_STEP, ADAM_EXP_AVG, ADAM_EXP_AVG_SQ)
OPT_STEP, OPT_EXP_AVG, OPT_EXP_AVG_SQ = (f"{OPT}{k}." for k in ADAMW_STATE)
META_STEP, META_LOG = "step", "log"  # checkpoint metadata: optimizer steps done, the run's log (JSON)
META_SHA256 = "sha256"  # checkpoint metadata: sha256 of the file the same tensors and other metadata make

# the train log (and the checkpoint's log)
LOG_CACHE_SOURCE, LOG_LOSSES, LOG_STEP_SECONDS = "cache_source", "losses", "step_seconds"
#: train_log.json: the step time the export predicted for the profile's device (``memory.seconds``)
LOG_PREDICTED_STEP_SECONDS = "predicted_step_seconds"
LOG_LOSS_WITHOUT_LORA = (
    "entry0_loss_without_lora"  # the first entry's loss before any update (the no-op check)
)

# the LoRA file
LORA_PREFIX = "transformer."  # diffusers name = LORA_PREFIX + peft name without PEFT_ADAPTER's "default."
PEFT_ADAPTER = ".default."
LORA_A, LORA_B = ".lora_A.", ".lora_B."
LORA_META_FORMAT, LORA_META_ADAPTER = "format", "lora_adapter_metadata"

SCHEDULE_RNG = RNG  # manifest schedule.rng / index schedule.meta.rng

# photos (docs/formats.md "Photos"; runtime/images.py and device_train/native/images.cpp)
PHOTO_MIN_SIDE = 64  # a photo whose shorter side (as stored) is below this is refused
PHOTO_MAX_PIXELS = (
    40_000_000  # width * height from the header above this is refused before decoding (whole Mpx)
)

# bounds on what a manifest, index or checkpoint may ask for (a reader refuses more before any work)
MAX_SAMPLES = 100_000  # schedule entries (K)
MAX_IMAGES = 100_000  # photos in a cache
MAX_STEPS = 10_000_000  # optimizer steps
MAX_GRAD_ACCUM = 10_000  # micro-steps per optimizer step
MAX_RANK = 4096  # LoRA rank
MAX_SIDE = 16_384  # px: s_min, s_max, granularity
MAX_JSON_DEPTH = 64  # nesting of a JSON document (the deepest declared one nests 10 levels)

# what formats.h declares, in this order
CPP_NAMES = (
    "MANIFEST",
    "SCHEMA_VERSION",
    "MANIFEST_SHA256",
    "CACHE_INDEX",
    "SHARD_PREFIX",
    "SHARD_DIGITS",
    "SHARD_SUFFIX",
    "CHECKPOINT_DIR",
    "CHECKPOINT",
    "LORA_FILE",
    "TRAIN_LOG",
    "LOCK_FILE",
    "TEMP_PREFIX",
    "TEMP_SUFFIX",
    "RECORD_FILE",
    "RECORD_SHA256",
    "RECORD_SIZE",
    "INDEX_SOURCE",
    "INDEX_SOURCE_SHA256",
    "INDEX_SCHEDULE",
    "INDEX_ENTRIES",
    "INDEX_MAX_RESIDENT_BLOCKS",
    "INDEX_PEAK_RSS_MIB",
    "INDEX_START_RSS_MIB",
    "SOURCE_BUNDLE",
    "SOURCE_IMAGES",
    "SCHEDULE_META",
    "SCHEDULE_ENTRIES",
    "ENTRY_IN",
    "ENTRY_CONST",
    "ENTRY_DELTA",
    "ENTRY_TARGET",
    "STATE_HIDDEN",
    "STATE",
    "CONST",
    "GRAD",
    "WEIGHT",
    "LORA",
    "OUT",
    "GRAD_IN",
    "LORA_GRAD",
    "LOSS",
    "LOSS_SCALE",
    "EMBED",
    "TEXT",
    "PARAM",
    "OPT",
    "OPT_STEP",
    "OPT_EXP_AVG",
    "OPT_EXP_AVG_SQ",
    "META_STEP",
    "META_LOG",
    "META_SHA256",
    "LOG_CACHE_SOURCE",
    "LOG_LOSSES",
    "LOG_STEP_SECONDS",
    "LOG_LOSS_WITHOUT_LORA",
    "LOG_PREDICTED_STEP_SECONDS",
    "LORA_PREFIX",
    "PEFT_ADAPTER",
    "LORA_A",
    "LORA_B",
    "LORA_META_FORMAT",
    "LORA_META_ADAPTER",
    "SCHEDULE_RNG",
    "PHOTO_MIN_SIDE",
    "PHOTO_MAX_PIXELS",
    "MAX_SAMPLES",
    "MAX_IMAGES",
    "MAX_STEPS",
    "MAX_GRAD_ACCUM",
    "MAX_RANK",
    "MAX_SIDE",
    "MAX_JSON_DEPTH",
)


def shard_name(k: int) -> str:
    """Cache shard of schedule entry ``k``."""
    return f"{SHARD_PREFIX}{k:0{SHARD_DIGITS}d}{SHARD_SUFFIX}"


def delta_key(block: int, state: str) -> str:
    """Cache tensor of the residual that the skipped span starting at ``block`` adds to ``state``."""
    return f"{ENTRY_DELTA}{block}.{state}"


def opt_key(state: str, name: str) -> str:
    """Checkpoint tensor of optimizer state ``state`` (``ADAMW_STATE``) of LoRA tensor ``name``."""
    return f"{OPT}{state}.{name}"


def source_digest(source: dict[str, Any] | None) -> str:
    """A cache's identity: sha256 of ``json.dumps(source, sort_keys=True)`` (ASCII-escaped), ``source``
    being ``{"bundle": sha256 of manifest.json, "images": {photo name: sha256}}``. Written into the
    index with the cache (``source_sha256``); readers take the stored value."""
    return hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()


def canonical_json(obj: object) -> bytes:
    """The canonical form of a JSON document: ``json.dumps(obj, sort_keys=True, separators=(",", ":"))``
    (ASCII, other characters escaped; floats as Python's repr). The C++ runner writes the same bytes for a
    document it parsed (json.h ``dump_canonical``)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode(
        "ascii"
    )


def manifest_digest(manifest: dict[str, Any]) -> str:
    """The manifest's integrity record: sha256 of the canonical form of the manifest without
    ``MANIFEST_SHA256``. The exporter writes it (``seal_manifest``); every reader checks it first."""
    return hashlib.sha256(
        canonical_json({k: v for k, v in manifest.items() if k != MANIFEST_SHA256})
    ).hexdigest()


def seal_manifest(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with its integrity record (a changed manifest must be sealed again to be read)."""
    return {
        **{k: v for k, v in manifest.items() if k != MANIFEST_SHA256},
        MANIFEST_SHA256: manifest_digest(manifest),
    }


# ------------------------------------------------------------------------------------------------
# Declarations. Annotated[..., {...}] adds JSON Schema keywords; a class in OPEN may hold keys beyond
# the declared ones (sections that vary by family, format or backend), every other record is closed.

Sha256 = Annotated[str, {"pattern": "^[0-9a-f]{64}$"}]
NonNegInt = Annotated[int, {"minimum": 0}]
PosInt = Annotated[int, {"minimum": 1}]
NonNeg = Annotated[float, {"minimum": 0}]
Positive = Annotated[float, {"exclusiveMinimum": 0}]
Identifier = Annotated[str, {"pattern": "^[A-Za-z_][A-Za-z0-9_]*$"}]
Decimal = Annotated[str, {"pattern": "^(0|[1-9][0-9]*)$"}]
Samples = Annotated[int, {"minimum": 1, "maximum": MAX_SAMPLES}]
Side = Annotated[int, {"minimum": 1, "maximum": MAX_SIDE}]


class JsonText:
    """A string holding a JSON document of type ``of`` (``contentMediaType``/``contentSchema``)."""

    def __init__(self, of: type):
        self.of = of


OPEN: dict[object, Any] = {}  # record -> the schema of its undeclared keys
_Record = TypeVar("_Record")


@overload
def open_record(cls: _Record, *, values: Any = True) -> _Record: ...
@overload
def open_record(cls: None = None, *, values: Any = True) -> Callable[[_Record], _Record]: ...
def open_record(cls: _Record | None = None, *, values: Any = True) -> _Record | Callable[[_Record], _Record]:
    """Mark a record as open (``values``: the schema of undeclared keys' values, ``True``: anything)."""

    def mark(c: _Record) -> _Record:
        OPEN[c] = values
        return c

    return mark(cls) if cls is not None else mark


# --- manifest.json ------------------------------------------------------------------------------


class FileRecord(TypedDict):
    """A file of the bundle (key: its path relative to the bundle): checked before it is used."""

    sha256: Sha256
    size: NonNegInt


class ScheduleParams(TypedDict):
    """The patch schedule's parameters (``PatchSchedule.build`` takes them with the photos' count)."""

    num_samples: Samples
    s_min: Side
    s_max: Side
    granularity: Side
    seed: NonNegInt
    patch_sampling: bool
    shift: Positive
    rng: Literal[RNG]  # type: ignore[valid-type]  # (a constant: the schema reads its value)
    T: NotRequired[PosInt]


@open_record
class ModelSection(TypedDict):
    """The transformer: family config, one weight file per block (``null``: a block no phase runs)."""

    config: dict[str, Any]
    blocks: list[str | None]
    embed: str
    head: str
    trained: list[NonNegInt]
    block_kinds: list[str]


EncoderSection = TypedDict("EncoderSection", {"class": str, "config": dict[str, Any], "file": str})
open_record(EncoderSection)
EncoderSection.__doc__ = "The photo encoder (VAE stand-in): class, config and weight file."

LoraAdapterConfig = TypedDict(
    "LoraAdapterConfig",
    {
        "transformer.r": PosInt,
        "transformer.lora_alpha": Positive,
        "transformer.target_modules": list[str],
    },
)
open_record(LoraAdapterConfig)
LoraAdapterConfig.__doc__ = "peft's LoraConfig with a ``transformer.`` prefix (what load_lora_adapter reads)."


@open_record(values={"type": "string"})
class LoraMetadata(TypedDict):
    """safetensors metadata of the LoRA file (strings only)."""

    format: Literal["pt"]
    lora_adapter_metadata: Annotated[str, JsonText(LoraAdapterConfig)]


class LoraSection(TypedDict):
    """The LoRA: rank, alpha (scale alpha/rank), target modules, the LoRA file's metadata."""

    rank: Annotated[int, {"minimum": 1, "maximum": MAX_RANK}]
    alpha: Positive
    targets: list[str]
    metadata: LoraMetadata


class ProgramIO(TypedDict):
    """One input or output of a program, in call order."""

    name: str
    shape: list[NonNegInt]
    dtype: str


class PteProgram(TypedDict):
    """An ExecuTorch program (``.pte``; ``data``: its ``.ptd`` of trainable weights)."""

    file: str
    arena_bytes: NonNegInt
    data: NotRequired[str]


class OnnxProgram(TypedDict):
    """An ONNX model."""

    file: str


@open_record
class ProgramRecord(TypedDict):
    """A stream program's calling convention and its file in each program format."""

    inputs: list[ProgramIO]
    outputs: list[ProgramIO]
    pte: NotRequired[PteProgram]
    onnx: NotRequired[OnnxProgram]


@open_record
class BlockShape(TypedDict):
    """Blocks that share one program: kind, LoRA targets, programs by role (forward, vjp, head ...)."""

    kind: str
    targets: list[str]
    example_block: NotRequired[NonNegInt]
    programs: dict[str, ProgramRecord]


class StreamSection(TypedDict):
    """Which block runs which shape's programs; the blocks' weight files are in ``model.blocks``."""

    storage: Literal[_plan.STORAGE]  # type: ignore[valid-type]  # (a constant: the schema reads its value)
    shapes: dict[str, BlockShape]
    train: list[tuple[NonNegInt, str]]
    precompute: list[tuple[NonNegInt, str]]
    lora_init: str
    block_paths: list[str]


class Optimizer(TypedDict):
    """AdamW's hyper-parameters as a training program was exported for (lr: ``plan.lr``)."""

    type: Literal["adamw"]
    betas: tuple[
        Annotated[float, {"minimum": 0, "exclusiveMaximum": 1}],
        Annotated[float, {"minimum": 0, "exclusiveMaximum": 1}],
    ]
    eps: Positive
    weight_decay: NonNeg
    adam_mode: NotRequired[Literal[0]]


class Tiles(TypedDict):
    """Tiled encoding: tiles of ``tile`` px every ``stride`` px, blended in latents ``ratio`` times smaller."""

    tile: Side
    stride: Side
    ratio: Side


@open_record
class EncoderPrograms(TypedDict):
    """A format's photo encoder: programs by input size ``<H>x<W>``, tiling when there are several."""

    input: list[PosInt]
    programs: dict[Annotated[str, {"pattern": "^[0-9]+x[0-9]+$"}], PteProgram | OnnxProgram]
    tiles: NotRequired[Tiles]


class PteTrain(TypedDict):
    """The resident span's ExecuTorch training program: entry tensors in call order (then loss_scale)."""

    file: str
    data: str
    arena_bytes: NonNegInt
    inputs: list[str]
    shapes: dict[str, list[NonNegInt]]
    lora: list[str]
    optimizer: Optimizer


@open_record
class PteSection(TypedDict):
    delegate: str
    encoder: EncoderPrograms
    train: NotRequired[PteTrain]


class OnnxTrainFiles(TypedDict):
    training: str
    eval: str
    optimizer: str
    checkpoint: str


class OnnxTrain(TypedDict):
    """The resident span's ONNX Runtime training artifacts."""

    files: OnnxTrainFiles
    optimizer: Optimizer
    inputs: list[str]
    shapes: dict[str, list[NonNegInt]]
    lora: list[str]


@open_record
class OnnxSection(TypedDict):
    opset: PosInt
    ir_version: PosInt
    encoder: EncoderPrograms
    train: NotRequired[OnnxTrain]


class MemoryAlternative(TypedDict):
    option: str
    phases: dict[str, NonNeg]


class MemorySection(TypedDict):
    """The dry run's predicted peak per phase in bytes (checked before each phase on the device)."""

    profile_budget_bytes: NonNegInt
    phases: dict[str, NonNegInt]
    alternatives: NotRequired[list[MemoryAlternative]]
    #: the predicted seconds per unit of each phase on the profile (``precompute_per_photo``,
    #: ``precompute_per_sample``, ``train_per_step``, ``save_per_checkpoint``), when it has time figures
    seconds: NotRequired[dict[str, NonNeg]]


@open_record
class ProfileRecord(TypedDict):
    """The device profile the plan was fitted to (as the profile file says)."""

    name: str


@open_record
class Manifest(TypedDict):
    """A bundle's manifest.json."""

    schema_version: Literal[SCHEMA_VERSION]  # type: ignore[valid-type]  # (a constant: the schema reads its value)
    family: str
    source_model: str
    profile: ProfileRecord
    prompt: str
    prompt_text: str
    plan: _plan.Plan
    schedule: ScheduleParams
    vae_factor: PosInt
    model: ModelSection
    encoder: EncoderSection
    lora: LoraSection
    formats: Annotated[list[Literal["torch", "onnx", "pte"]], {"minItems": 1}]
    stream: StreamSection
    pte: NotRequired[PteSection]
    onnx: NotRequired[OnnxSection]
    memory: NotRequired[MemorySection]
    files: dict[str, FileRecord]
    canonical_sha256: Annotated[Sha256, "sha256 of the canonical form of the manifest without this key"]


# --- the cache -----------------------------------------------------------------------------------


class CacheSource(TypedDict):
    """What a cache was computed from: the manifest's sha256 and each photo's (by file name)."""

    bundle: Sha256
    images: dict[str, Sha256]


class ScheduleMeta(TypedDict):
    """The realised schedule's parameters (the manifest's, with the photos' count)."""

    num_images: Annotated[int, {"minimum": 1, "maximum": MAX_IMAGES}]
    s_min: Side
    s_max: Side
    granularity: Side
    seed: NonNegInt
    patch_sampling: bool
    shift: Positive
    T: PosInt
    resize: Literal["area"]
    rng: Literal[RNG]  # type: ignore[valid-type]  # (a constant: the schema reads its value)


class RealisedSchedule(TypedDict):
    meta: ScheduleMeta
    entries: Annotated[list[ScheduleEntry], {"minItems": 1, "maxItems": MAX_SAMPLES}]


class ShardRecord(TypedDict):
    file: Annotated[str, {"pattern": f"^{SHARD_PREFIX}[0-9]{{{SHARD_DIGITS},}}\\{SHARD_SUFFIX}$"}]
    sha256: Sha256


class CacheIndex(TypedDict):
    """A cache's index.json."""

    source: CacheSource
    source_sha256: Sha256
    schedule: RealisedSchedule
    entries: dict[Decimal, ShardRecord]
    max_resident_blocks: NotRequired[NonNegInt]
    peak_rss_mib: NotRequired[NonNeg]
    start_rss_mib: NotRequired[NonNeg]


# --- train log, checkpoint metadata, LoRA file -----------------------------------------------


@open_record
class TrainLog(TypedDict):
    """train_log.json; the checkpoint's ``log`` holds the same up to its step, without the end's keys and
    without ``step_seconds`` (timings differ from run to run; the checkpoint does not)."""

    plan: _plan.Plan
    backend: str
    losses: list[float]
    step_seconds: NotRequired[list[NonNeg]]  # train_log.json: each step this process ran
    predicted_step_seconds: NotRequired[NonNeg]  # train_log.json: the export's prediction (memory.seconds)
    resumed_from: NonNegInt
    cache_source: Sha256
    peak_rss_mib: NotRequired[NonNeg]
    start_rss_mib: NotRequired[NonNeg]
    lora: NotRequired[str]
    entry0_loss_without_lora: NotRequired[float]  # the first cache entry's loss with the LoRA at zero
    lora_files: NotRequired[dict[str, str]]  # device-train: each LoRA layout written and its path
    span: NotRequired[Literal[_plan.SPANS]]  # type: ignore[valid-type]  # (a constant: the schema reads its value)
    storage: NotRequired[str]
    block_backend: NotRequired[str]
    weight_file_reads: NotRequired[NonNegInt]
    delegate: NotRequired[str]
    blocks_loaded: NotRequired[list[str]]


# --- run events (device-train --events FILE, blockskip-train-native --events FILE) -----------------
# One JSON object a line, flushed as it happens, so an app can follow a run without parsing a terminal.
EVENT_PHASES = ("precompute", "train")


class PhaseStartEvent(TypedDict):
    """A phase begins."""

    event: Literal["phase_start"]
    time: Annotated[NonNeg, "seconds since the Unix epoch"]
    phase: Literal[EVENT_PHASES]  # type: ignore[valid-type]  # (a constant: the schema reads its value)


class PhaseEndEvent(TypedDict):
    """A phase finished (its outputs are written)."""

    event: Literal["phase_end"]
    time: NonNeg
    phase: Literal[EVENT_PHASES]  # type: ignore[valid-type]  # (a constant: the schema reads its value)
    seconds: Annotated[NonNeg, "the phase's wall time"]


class PrecomputeProgressEvent(TypedDict):
    """Precompute did one more unit of work (a block pass or a written entry) of ``total``."""

    event: Literal["precompute_progress"]
    time: NonNeg
    done: NonNegInt
    total: NonNegInt


class StepEvent(TypedDict):
    """An optimizer step finished."""

    event: Literal["step"]
    time: NonNeg
    step: PosInt
    steps: PosInt
    loss: float
    step_seconds: NonNeg
    peak_rss_mib: NonNeg
    eta_seconds: Annotated[NonNeg, "the steps left times the mean step time so far"]


class CheckpointEvent(TypedDict):
    """The checkpoint was written (atomically) after ``step`` steps."""

    event: Literal["checkpoint"]
    time: NonNeg
    step: PosInt
    path: str


class ErrorEvent(TypedDict):
    """The run stopped: ``kind`` is the typed error's class (``internal`` for an unexpected one)."""

    event: Literal["error"]
    time: NonNeg
    kind: str
    message: str


class DoneEvent(TypedDict):
    """The command succeeded: what it wrote (``lora``, ``lora_kohya``, ``lora_comfy``, ``train_log``, ``cache``)."""

    event: Literal["done"]
    time: NonNeg
    outputs: dict[str, str]


EVENTS = (
    PhaseStartEvent,
    PhaseEndEvent,
    PrecomputeProgressEvent,
    StepEvent,
    CheckpointEvent,
    ErrorEvent,
    DoneEvent,
)


class CheckpointMetadata(TypedDict):
    """The checkpoint's safetensors metadata."""

    step: Decimal
    log: Annotated[str, JsonText(TrainLog)]
    sha256: Annotated[Sha256, "sha256 of the file the same tensors and the other metadata make"]


class TensorHeader(TypedDict):
    """A tensor's entry in a safetensors header."""

    dtype: Literal[tuple(DTYPES)]  # type: ignore[valid-type]  # (a constant: the schema reads its value)
    shape: list[NonNegInt]
    data_offsets: tuple[NonNegInt, NonNegInt]


class AdamWState(TypedDict):
    """One LoRA tensor's AdamW state (``runtime.adamw.AdamW.state[name]``; in the checkpoint the float32
    tensors ``opt.<key>.<name>``): ``step`` [1] the updates applied, ``exp_avg`` and ``exp_avg_sq`` the
    moments, in the parameter's shape."""

    step: np.ndarray
    exp_avg: np.ndarray
    exp_avg_sq: np.ndarray


# ------------------------------------------------------------------------------------------------
# Rules between values, which JSON Schema cannot say: each is (check, a, b), a and b paths into the
# document (keys, array indices, "*" for every element or value). A rule whose path is absent is skipped
# (the schema says what is required). The schema carries them as "x-rules"; runtime/schema_check.py and
# device_train/native/schema.cpp check them after the schema.
#   lt, le       every a < b, a <= b (numbers)
#   eq           every a == b (JSON values)
#   multiple_of  every a is a multiple of b (integers)
#   index_into   every a (integer) indexes the array b
#   key_in       every a (string; null skipped) is a key of the object b
#   same_length  arrays a and b have as many elements
#   keys_index   every key of object a (a decimal string) indexes the array b

RULE_CHECKS = ("lt", "le", "eq", "multiple_of", "index_into", "key_in", "same_length", "keys_index")
_PROGRAM_FILES = [["pte", "file"], ["pte", "data"], ["onnx", "file"]]
RULES: dict[str, list[tuple[str, Sequence[str | int], Sequence[str | int]]]] = {
    "manifest": [
        ("multiple_of", ["schedule", "s_min"], ["schedule", "granularity"]),
        ("multiple_of", ["schedule", "s_max"], ["schedule", "granularity"]),
        ("le", ["schedule", "s_min"], ["schedule", "s_max"]),
        *[
            ("eq", ["plan", p], ["schedule", q])
            for p, q in (
                ("s_min", "s_min"),
                ("s_max", "s_max"),
                ("num_samples", "num_samples"),
                ("seed", "seed"),
                ("patch_sampling", "patch_sampling"),
                ("timestep_shift", "shift"),
            )
        ],
        ("eq", ["lora", "rank"], ["plan", "lora_rank"]),
        ("same_length", ["model", "block_kinds"], ["model", "blocks"]),
        ("same_length", ["stream", "block_paths"], ["model", "blocks"]),
        ("index_into", ["model", "trained", "*"], ["model", "blocks"]),
        ("index_into", ["stream", "train", "*", 0], ["model", "blocks"]),
        ("index_into", ["stream", "precompute", "*", 0], ["model", "blocks"]),
        ("key_in", ["stream", "train", "*", 1], ["stream", "shapes"]),
        ("key_in", ["stream", "precompute", "*", 1], ["stream", "shapes"]),
        *[
            ("key_in", a, ["files"])
            for a in (
                ["model", "blocks", "*"],
                ["model", "embed"],
                ["model", "head"],
                ["encoder", "file"],
                ["prompt"],
                ["stream", "lora_init"],
                *[["stream", "shapes", "*", "programs", "*", *f] for f in _PROGRAM_FILES],
                ["pte", "encoder", "programs", "*", "file"],
                ["onnx", "encoder", "programs", "*", "file"],
                ["pte", "train", "file"],
                ["pte", "train", "data"],
                ["onnx", "train", "files", "*"],
            )
        ],
        *[
            r
            for fmt in ("pte", "onnx")
            for r in (
                ("le", [fmt, "encoder", "tiles", "stride"], [fmt, "encoder", "tiles", "tile"]),
                ("multiple_of", [fmt, "encoder", "tiles", "tile"], [fmt, "encoder", "tiles", "ratio"]),
                ("multiple_of", [fmt, "encoder", "tiles", "stride"], [fmt, "encoder", "tiles", "ratio"]),
                ("eq", [fmt, "encoder", "tiles", "ratio"], ["vae_factor"]),
            )
        ],
    ],
    "cache_index": [
        ("multiple_of", ["schedule", "meta", "s_min"], ["schedule", "meta", "granularity"]),
        ("multiple_of", ["schedule", "meta", "s_max"], ["schedule", "meta", "granularity"]),
        ("le", ["schedule", "meta", "s_min"], ["schedule", "meta", "s_max"]),
        ("lt", ["schedule", "entries", "*", "image"], ["schedule", "meta", "num_images"]),
        ("le", ["schedule", "entries", "*", "t"], ["schedule", "meta", "T"]),
        ("le", ["schedule", "entries", "*", "side"], ["schedule", "meta", "s_max"]),
        ("keys_index", ["entries"], ["schedule", "entries"]),
    ],
}


# ------------------------------------------------------------------------------------------------
# JSON Schema from the declarations

DRAFT = "https://json-schema.org/draft/2020-12/schema"
FLOAT_DTYPES = ("F32", "F16", "BF16")  # cache entries: float32 or the plan's dtype
_PLAN_ENUMS = {
    "span": _plan.SPANS,
    "storage": _plan.STORAGE,
    "weights": _plan.WEIGHTS,
    "stash": _plan.STASH,
    "optimizer": _plan.OPTIMIZERS,
    "base_quant": _plan.BASE_QUANT,
}


# the plan's values' ranges (plan.validate refuses the same)
def _range(lo: float, hi: float | None = None, exclusive: bool = False) -> dict[str, float]:
    return {"exclusiveMinimum" if exclusive else "minimum": lo, **({"maximum": hi} if hi is not None else {})}


_PLAN_RANGES: dict[str, dict[str, Any]] = {
    "front_skip": _range(0),
    "back_skip": _range(0),
    "lora_rank": _range(1, MAX_RANK),
    "s_min": _range(1, MAX_SIDE),
    "s_max": _range(1, MAX_SIDE),
    "num_samples": _range(1, MAX_SAMPLES),
    "steps": _range(1, MAX_STEPS),
    "grad_accum": _range(1, MAX_GRAD_ACCUM),
    "seed": _range(0),
    "checkpoint_every": _range(1),
    "precompute_chunk": _range(0, MAX_SAMPLES),
    "lr": _range(0, exclusive=True),
    "lora_alpha": _range(0, exclusive=True),
    "weight_decay": _range(0),
    "timestep_shift": _range(0, exclusive=True),
    "positions": {"enum": ["crop", "native"]},
    "dtype": {"enum": ["float32", "bfloat16", "float16"]},
}
_RANGES: dict[type, dict[str, dict[str, Any]]] = {
    _plan.Plan: _PLAN_RANGES,
    ScheduleEntry: {
        "index": _range(0, MAX_SAMPLES - 1),
        "image": _range(0, MAX_IMAGES - 1),
        "t": _range(1),
        "sigma": {"exclusiveMinimum": 0, "maximum": 1},
        "side": _range(1, MAX_SIDE),
        "top": _range(0, MAX_SIDE),
        "left": _range(0, MAX_SIDE),
        "noise_seed": _range(0),
    },
}
_SIMPLE = {str: "string", bool: "boolean", int: "integer", float: "number", type(None): "null"}
_DATACLASS_DOCS = {
    _plan.Plan: "The training plan: every field of runtime/plan.py's Plan, no other.",
    ScheduleEntry: "One draw of the schedule (runtime/schedule.py's ScheduleEntry).",
}


class _Builder:
    def __init__(self) -> None:
        self.defs: dict[str, dict[str, Any]] = {}

    def ref(self, cls: type) -> dict[str, Any]:
        name = cls.__name__
        if name not in self.defs:
            self.defs[name] = {}  # recursion guard
            self.defs[name] = self.record(cls)
        return {"$ref": f"#/$defs/{name}"}

    def record(self, cls: type) -> dict[str, Any]:
        if dataclasses.is_dataclass(cls):
            hints = typing.get_type_hints(cls, vars(sys.modules[cls.__module__]), include_extras=True)
            props = {f.name: self.schema(hints[f.name]) for f in dataclasses.fields(cls)}
            if cls is _plan.Plan:
                for name, values in _PLAN_ENUMS.items():
                    nullable = type(None) in typing.get_args(hints[name])
                    props[name] = {"enum": list(values) + ([None] if nullable else [])}
            for name, extra in _RANGES.get(cls, {}).items():
                props[name] = {**props[name], **extra} if "enum" not in extra else extra
            out: dict[str, Any] = {
                "type": "object",
                "properties": props,
                "required": list(props),
                "additionalProperties": False,
            }
            return {"description": _DATACLASS_DOCS[cls], **out} if cls in _DATACLASS_DOCS else out
        hints = typing.get_type_hints(cls, include_extras=True)
        props = {k: self.schema(t) for k, t in hints.items()}
        required = [k for k in hints if k in cls.__required_keys__]  # type: ignore[attr-defined]  # (a TypedDict)
        out = {"type": "object", "properties": props, "required": required}
        extra = OPEN.get(cls, False)
        if extra is not True:
            out["additionalProperties"] = extra
        if cls.__doc__:
            out = {"description": " ".join(cls.__doc__.replace("``", "`").split()), **out}
        return out

    def schema(self, tp: Any) -> dict[str, Any]:  # tp: a type expression
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Annotated:
            out = dict(self.schema(args[0]))
            for extra in args[1:]:
                if isinstance(extra, dict):
                    out.update(extra)
                elif isinstance(extra, str):
                    out["description"] = extra
                elif isinstance(extra, JsonText):
                    out.update({"contentMediaType": "application/json", "contentSchema": self.ref(extra.of)})
            return out
        if origin in (NotRequired, Required):
            return self.schema(args[0])
        if origin is Literal:
            return {"const": args[0]} if len(args) == 1 else {"enum": list(args)}
        if origin in (typing.Union, types.UnionType):
            parts = [self.schema(a) for a in args]
            if all(set(p) == {"type"} for p in parts):
                return {"type": [p["type"] for p in parts]}
            return {"anyOf": parts}
        if origin is list:
            return {"type": "array", "items": self.schema(args[0])}
        if origin is tuple:
            return {
                "type": "array",
                "prefixItems": [self.schema(a) for a in args],
                "minItems": len(args),
                "maxItems": len(args),
            }
        if origin is dict:
            out = {"type": "object"}
            key = self.schema(args[0])
            if set(key) - {"type"}:
                out["propertyNames"] = {k: v for k, v in key.items() if k != "type"}
            if args[1] is not Any:
                out["additionalProperties"] = self.schema(args[1])
            return out
        if tp is Any:
            return {}
        if tp is dict:
            return {"type": "object"}
        if tp in _SIMPLE:
            return {"type": _SIMPLE[tp]}
        if typing.is_typeddict(tp) or dataclasses.is_dataclass(tp):
            return self.ref(tp)
        raise TypeError(f"no JSON Schema for {tp!r}")

    def tensor(
        self, dtypes: Iterable[str] | None = None, shape: Iterable[int] | None = None
    ) -> dict[str, Any]:
        out = self.ref(TensorHeader)
        props: dict[str, Any] = {}
        if dtypes is not None:
            props["dtype"] = {"enum": list(dtypes)}
        if shape is not None:
            props["shape"] = {"const": list(shape)}
        return {**out, "properties": props} if props else out


def _some_name(pattern: str) -> dict[str, Any]:
    """At least one key matches ``pattern``."""
    return {"not": {"propertyNames": {"not": {"pattern": pattern}}}}


def _document(
    kind: str, title: str, description: str, build: Callable[[_Builder], dict[str, Any]]
) -> dict[str, Any]:
    b = _Builder()
    body = build(b)
    doc = {"$schema": DRAFT, "$id": f"{kind}.schema.json", "title": title, "description": description, **body}
    if kind in RULES:
        doc["x-rules"] = [{"check": c, "a": a, "b": b} for c, a, b in RULES[kind]]
    if b.defs:
        doc["$defs"] = {k: b.defs[k] for k in sorted(b.defs)}
    return doc


def _safetensors_header(
    tensors: dict[str, dict[str, Any]],
    named: dict[str, dict[str, Any]],
    metadata: dict[str, Any],
    required: list[str],
    some: list[str],
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "type": "object",
        "properties": {"__metadata__": metadata, **named},
        "patternProperties": tensors,
        "required": required,
        "additionalProperties": False,
    }
    if some:
        out["allOf"] = [_some_name(p) for p in some]
    return out


_NAME = "[A-Za-z_][A-Za-z0-9_]*"


def _cache_entry(b: _Builder) -> dict[str, Any]:
    f = b.tensor(FLOAT_DTYPES)
    return _safetensors_header(
        {
            f"^{_re(ENTRY_IN)}{_NAME}$": f,
            f"^{_re(ENTRY_CONST)}{_NAME}$": f,
            f"^{_re(ENTRY_DELTA)}(0|[1-9][0-9]*)\\.{_NAME}$": f,
        },
        {ENTRY_TARGET: f},
        {"type": "object", "additionalProperties": {"type": "string"}},
        [ENTRY_TARGET],
        [f"^{_re(ENTRY_IN)}"],
    )


def _checkpoint(b: _Builder) -> dict[str, Any]:
    floats = b.tensor(FLOAT_DTYPES)
    return _safetensors_header(
        {
            f"^{_re(PARAM)}.+$": floats,
            f"^{_re(OPT_STEP)}.+$": b.tensor(("F32", "I64"), [1]),  # I64: bitsandbytes' 8-bit AdamW
            f"^{_re(OPT_EXP_AVG)}.+$": floats,
            f"^{_re(OPT_EXP_AVG_SQ)}.+$": floats,
            f"^{_re(OPT)}{_NAME}\\..+$": b.tensor(),
        },  # other optimizers' state (8-bit AdamW)
        {},
        b.ref(CheckpointMetadata),
        ["__metadata__"],
        [f"^{_re(PARAM)}"],
    )


def _lora(b: _Builder) -> dict[str, Any]:
    return _safetensors_header(
        {f"^{_re(LORA_PREFIX)}.+\\.lora_[AB]\\.weight$": b.tensor(("F32",))},
        {},
        b.ref(LoraMetadata),
        ["__metadata__"],
        [f"^{_re(LORA_PREFIX)}"],
    )


def _re(s: str) -> str:
    return s.replace(".", "\\.")


SPECS: dict[str, tuple[str, str, Any]] = {
    "manifest": (
        "manifest.json",
        "A bundle's manifest: what the exporter wrote and every reader takes.",
        lambda b: b.ref(Manifest),
    ),
    "cache_index": (
        "index.json",
        "A residual cache's index: identity, realised schedule, one shard per entry.",
        lambda b: b.ref(CacheIndex),
    ),
    "cache_entry": (
        "entry_<k>.safetensors header",
        "A cache shard (the safetensors header): in.<state>, "
        "c.<const>, delta.<block>.<state> and target, float32 or the plan's dtype.",
        _cache_entry,
    ),
    "checkpoint": (
        "checkpoint.safetensors header",
        "The shared checkpoint (the safetensors header): "
        "param.<peft name>, opt.<state>.<peft name>, metadata step and log.",
        _checkpoint,
    ),
    "optimizer": (
        "optimizer record",
        "AdamW's hyper-parameters of a training program (manifest "
        "pte.train.optimizer, onnx.train.optimizer).",
        lambda b: b.ref(Optimizer),
    ),
    "train_log": (
        "train_log.json",
        "A training run's log (also the checkpoint's log metadata).",
        lambda b: b.ref(TrainLog),
    ),
    "lora": (
        "lora.safetensors header",
        "The trained LoRA (the safetensors header): diffusers names, float32, peft's metadata.",
        _lora,
    ),
    "event": (
        "run event",
        "One line of device-train's (or the native runner's) --events file.",
        lambda b: {"oneOf": [b.ref(e) for e in EVENTS]},
    ),
}
KINDS = tuple(SPECS)


def schema(kind: str) -> dict[str, Any]:
    """The JSON Schema of ``kind`` (one of ``KINDS``)."""
    if kind not in SPECS:
        raise KeyError(f"unknown format {kind!r}; known: {', '.join(KINDS)}")
    title, description, build = SPECS[kind]
    return _document(kind, title, description, build)


# the JSON documents inside string values: (kind, path to the string, $defs entry it holds)
EMBEDDED = {
    "checkpoint": [(("__metadata__", META_LOG), "TrainLog")],
    "lora": [(("__metadata__", LORA_META_ADAPTER), "LoraAdapterConfig")],
}


def validate(kind: str, obj: Any) -> None:
    """Check ``obj`` (a parsed JSON document, or a safetensors header) against ``kind``'s schema, and
    the JSON documents embedded in its strings; raises ``jsonschema.ValidationError``. Needs the
    ``jsonschema`` package (tests only)."""
    try:
        import jsonschema  # type: ignore[import-untyped]
    except ImportError as e:  # pragma: no cover
        raise ImportError("validating a format needs the jsonschema package: pip install jsonschema") from e
    s = schema(kind)
    jsonschema.Draft202012Validator(s).validate(obj)
    for path, name in EMBEDDED.get(kind, ()):
        text = obj
        for key in path:
            text = text[key]
        try:
            inner = json.loads(text)
        except json.JSONDecodeError as e:
            raise jsonschema.ValidationError(f"{'/'.join(path)} is not JSON ({e})") from e
        jsonschema.Draft202012Validator({"$ref": f"#/$defs/{name}", "$defs": s["$defs"]}).validate(inner)


def safetensors_header(path: str | Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor records and ``__metadata__``)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header: dict[str, Any] = json.loads(f.read(n))
        return header


# ------------------------------------------------------------------------------------------------
# The written files: docs/schemas/<kind>.schema.json and device_train/native/formats.h

HEADER = Path("device_train") / "native" / "formats.h"
SCHEMAS_HEADER = "schemas.h"  # beside HEADER: the schemas the C++ runner checks its inputs against
NATIVE_KINDS = ("manifest", "cache_index", "cache_entry", "checkpoint")  # what the runner reads


def schema_text(kind: str) -> str:
    return json.dumps(schema(kind), indent=2) + "\n"


def _cpp_name(name: str) -> str:
    return "k" + "".join(p.capitalize() for p in name.lower().split("_"))


def cpp_header() -> str:
    """device_train/native/formats.h: the names above as C++ constants."""
    g = globals()
    lines = [
        "// The on-disk formats' names, shared with the Python runtime. Generated from runtime/formats.py",
        "// by `python -m blockskip.runtime.formats --write docs/schemas`; do not edit (docs/formats.md).",
        "#pragma once",
        "",
        "namespace blockskip {",
        "namespace formats {",
        "",
    ]
    for name in CPP_NAMES:
        v = g[name]
        if isinstance(v, bool) or not isinstance(v, int | str):
            raise TypeError(f"{name} is neither a string nor an integer")
        if isinstance(v, int):
            lines.append(f"inline constexpr int {_cpp_name(name)} = {v};")
        else:
            lines.append(f"inline constexpr char {_cpp_name(name)}[] = {json.dumps(v)};")
    lines += ["", "}  // namespace formats", "}  // namespace blockskip", ""]
    return "\n".join(lines)


def cpp_schemas() -> str:
    """device_train/native/schemas.h: the JSON Schemas of what the runner reads, as C++ string constants
    (``kSchema<Kind>``), so the runner checks its inputs against the same declarations."""
    lines = [
        "// The JSON Schemas of the formats the runner reads. Generated from runtime/formats.py by",
        "// `python -m blockskip.runtime.formats --write docs/schemas`; do not edit (docs/formats.md).",
        "#pragma once",
        "",
        "namespace blockskip {",
        "namespace formats {",
        "",
    ]
    for kind in NATIVE_KINDS:
        text = json.dumps(schema(kind), separators=(",", ":"))
        if ')schema"' in text:
            raise ValueError(f"the {kind} schema holds the raw-string delimiter")
        lines.append(f'inline constexpr char {_cpp_name("schema_" + kind)}[] = R"schema({text})schema";')
    lines += ["", "}  // namespace formats", "}  // namespace blockskip", ""]
    return "\n".join(lines)


def outputs(schema_dir: str | Path, header: str | Path | None) -> dict[Path, str]:
    """Every generated file and its text."""
    out = {Path(schema_dir) / f"{k}.schema.json": schema_text(k) for k in KINDS}
    if header is not None:
        out[Path(header)] = cpp_header()
        out[Path(header).parent / SCHEMAS_HEADER] = cpp_schemas()
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m blockskip.runtime.formats",
        description="Write (or check) the formats' JSON Schemas and the C++ header.",
    )
    g = ap.add_mutually_exclusive_group(required=True)
    g.add_argument("--write", metavar="DIR", help="write DIR/<kind>.schema.json and the header")
    g.add_argument("--check", metavar="DIR", help="exit 1 if DIR's schemas or the header are out of date")
    ap.add_argument(
        "--header",
        default=str(HEADER),
        help=f"the C++ header (default {HEADER}, relative to the current folder; '' for none)",
    )
    a = ap.parse_args(argv)
    files = outputs(a.write or a.check, a.header or None)
    if a.check:
        stale = [str(p) for p, text in files.items() if not p.is_file() or p.read_text() != text]
        for name in stale:
            print(f"out of date: {name}", file=sys.stderr)
        return 1 if stale else 0
    for p, text in files.items():
        p.parent.mkdir(parents=True, exist_ok=True)
        if not p.is_file() or p.read_text() != text:
            p.write_text(text)
            print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
