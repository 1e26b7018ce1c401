"""Device profiles: TOML files in ``blockskip/profiles`` (or a path to one).

Stdlib only (no numpy/torch): ``blockskip-plan`` and the dry run read profiles on machines that have
nothing else installed. The schema is documented in ``docs/profiles.md``; it is checked here by a
small hand-written table (``FIELDS``), and every error names the field and its line in the file.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from blockskip.runtime.errors import ProfileError

MIB = 1 << 20
GIB = 1 << 30

#: dtypes a model can be exported/trained in (``compute.default_dtype``).
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
#: dtypes an engine may list in ``[compute.dtypes]``.
DTYPES = ("float32", "bfloat16", "float16", "int8", "int4")
#: compute engines of a device (keys of ``[compute.dtypes]``).
ENGINES = ("cpu", "gpu", "npu")
#: runtime backends a profile may list in ``backends.available``.
BACKENDS = ("executorch-xnnpack", "onnxruntime-training", "torch-cpu", "torch-cuda")
#: how ops are run, for their per-op overhead (``[compute.op_overhead_us]``): eager torch ops, or a
#: runtime executing a lowered program (ExecuTorch, ONNX Runtime)
RUNTIMES = ("torch", "program")

# --------------------------------------------------------------------------------------------------
# schema: dotted field -> (kind, check). A check returns None when the value is fine, else a phrase
# that completes "<field> must ...". Every field is required; unknown fields are errors.
# --------------------------------------------------------------------------------------------------

NUMBER = "number"
TABLES = ("memory", "storage", "compute", "compute.dtypes", "backends")


def _positive(v: float) -> str | None:
    return None if v > 0 else f"be > 0 (got {v})"


def _non_negative(v: float) -> str | None:
    return None if v >= 0 else f"be >= 0 (got {v})"


def _fraction(v: float) -> str | None:
    return None if 0 <= v < 1 else f"be a fraction in [0, 1) (got {v})"


def _power_of_two(v: int) -> str | None:
    return None if v > 0 and v & (v - 1) == 0 else f"be a power of two > 0 (got {v})"


def _non_empty(v: str) -> str | None:
    return None if v.strip() else "not be empty"


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str | None]:
    def check(v: str) -> str | None:
        return None if v in choices else f"be one of {', '.join(choices)} (got {v!r})"

    return check


def _names_from(kind: str, choices: tuple[str, ...]) -> Callable[[list[object]], str | None]:
    def check(v: list[object]) -> str | None:
        if not v:
            return f"list at least one {kind} (known: {', '.join(choices)})"
        for x in v:
            if not isinstance(x, str):
                return f"be a list of strings (got {type(x).__name__} {x!r})"
            if x not in choices:
                return f"only list known {kind}s: unknown {kind} {x!r} (known: {', '.join(choices)})"
        if len(set(v)) != len(v):
            return f"not repeat a {kind} (got {v})"
        return None

    return check


FIELDS: dict[str, tuple[Any, Callable[[Any], str | None] | None]] = {
    "name": (str, _non_empty),
    "description": (str, None),
    "memory.ram_gib": (NUMBER, _positive),
    "memory.budget_gib": (NUMBER, _positive),
    "memory.runtime_overhead_mib": (NUMBER, _non_negative),
    "memory.cuda_context_mib": (NUMBER, _non_negative),
    "memory.allocator_slack": (NUMBER, _fraction),
    "memory.safety_margin_mib": (NUMBER, _non_negative),
    "memory.alloc_round_bytes": (int, _power_of_two),
    "memory.bandwidth_gbs": (NUMBER, _positive),
    "storage.cache_budget_gib": (NUMBER, _non_negative),
    "storage.read_mbs": (NUMBER, _positive),
    "compute.default_dtype": (str, _one_of(COMPUTE_DTYPES)),
    "backends.available": (list, _names_from("backend", BACKENDS)),
}
# [compute.dtypes]: engine -> list of dtypes; any subset of ENGINES, at least one.
ENGINE_CHECK = _names_from("dtype", DTYPES)

_KIND_WORDS = {NUMBER: "a number", str: "a string", int: "an integer", list: "a list", dict: "a table"}


def _kind_ok(kind: Any, v: Any) -> bool:
    if isinstance(v, bool):  # TOML true/false are bools, never numbers
        return kind is bool
    if kind is NUMBER:
        return isinstance(v, int | float)
    return isinstance(v, kind)


def _type_name(v: Any) -> str:
    return {bool: "boolean", int: "integer", float: "float", str: "string", list: "list", dict: "table"}.get(
        type(v), type(v).__name__
    )


# --------------------------------------------------------------------------------------------------
# line numbers: tomllib gives none, so a small scanner maps each key / table header to its line.
# It runs only on text tomllib has accepted, so it can assume valid TOML.
# --------------------------------------------------------------------------------------------------

_KEY_PART = r'(?:[A-Za-z0-9_-]+|"(?:[^"\\]|\\.)*"|\'[^\']*\')'
_DOTTED = rf"{_KEY_PART}(?:\s*\.\s*{_KEY_PART})*"
_HEADER_RE = re.compile(rf"^\s*\[\[?\s*({_DOTTED})\s*\]\]?")
_KEYVAL_RE = re.compile(rf"^\s*({_DOTTED})\s*=")
_PART_RE = re.compile(_KEY_PART)


def _split_key(dotted: str) -> tuple[str, ...]:
    out = []
    for part in _PART_RE.findall(dotted):
        if part[0] in "\"'":
            part = part[1:-1]
        out.append(part)
    return tuple(out)


def _scan_state(line: str, ml: str | None, depth: int) -> tuple[str | None, int]:
    """Carry multi-line string / open bracket state across one line."""
    i, n = 0, len(line)
    while i < n:
        if ml is not None:
            j = line.find(ml, i)
            if j < 0:
                return ml, depth
            i, ml = j + 3, None
            continue
        c = line[i]
        if c == "#":
            break
        if line.startswith('"""', i) or line.startswith("'''", i):
            ml, i = line[i : i + 3], i + 3
            continue
        if c == '"':
            i += 1
            while i < n and line[i] != '"':
                i += 2 if line[i] == "\\" else 1
        elif c == "'":
            j = line.find("'", i + 1)
            i = n if j < 0 else j
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        i += 1
    return ml, depth


def key_lines(text: str) -> dict[tuple[str, ...], int]:
    """Map every key path and table path in a (valid) TOML text to its 1-based line number.

    A table that is only implied (``[compute.dtypes]`` without ``[compute]``) gets the line of its
    first appearance; an explicit header wins over that. Keys inside inline tables and values are
    not listed (``line_of`` falls back to the enclosing key).
    """
    lines: dict[tuple[str, ...], int] = {}
    explicit: set[tuple[str, ...]] = set()
    table: tuple[str, ...] = ()
    ml: str | None = None
    depth = 0

    def record(path: tuple[str, ...], n: int) -> None:
        for k in range(1, len(path)):
            lines.setdefault(path[:k], n)
        lines.setdefault(path, n)

    for n, line in enumerate(text.splitlines(), 1):
        if ml is None and depth == 0:
            m = _HEADER_RE.match(line)
            if m:
                table = _split_key(m.group(1))
                record(table, n)
                if table not in explicit:
                    explicit.add(table)
                    lines[table] = n
            else:
                m = _KEYVAL_RE.match(line)
                if m:
                    record(table + _split_key(m.group(1)), n)
        ml, depth = _scan_state(line, ml, depth)
    return lines


def line_of(lines: dict[tuple[str, ...], int], path: tuple[str, ...]) -> int:
    """Line of ``path``, or of the nearest enclosing table that is in the file (the document: 1)."""
    for k in range(len(path), 0, -1):
        if path[:k] in lines:
            return lines[path[:k]]
    return 1


# --------------------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------------------


def validate(raw: dict[str, Any], text: str) -> list[tuple[int, str]]:
    """All schema problems of a parsed profile as (line, message): wrong fields first, then missing
    ones, each in file order."""
    lines = key_lines(text)
    problems: list[tuple[int, int, str]] = []  # (rank, line, message)

    def add(path: tuple[str, ...], msg: str, rank: int = 0) -> None:
        # rank 0: a field that is there but wrong; 1: something missing (a typo'd key shows up as
        # both: the unknown key is the more useful message, so it sorts first)
        problems.append((rank, line_of(lines, path), msg))

    def get(path: tuple[str, ...]) -> tuple[bool, Any]:
        node: Any = raw
        for p in path:
            if not isinstance(node, dict) or p not in node:
                return False, None
            node = node[p]
        return True, node

    # unknown fields and tables
    def walk(node: dict[str, Any], prefix: tuple[str, ...]) -> None:
        for k, v in node.items():
            path = (*prefix, k)
            dotted = ".".join(path)
            if prefix == ("compute", "dtypes"):
                if k not in ENGINES:
                    add(path, f"unknown engine {dotted} (engines: {', '.join(ENGINES)})")
            elif dotted in ("compute.throughput", "compute.op_overhead_us"):
                continue  # optional, checked below
            elif dotted in TABLES:
                if isinstance(v, dict):
                    walk(v, path)
            elif dotted not in FIELDS:
                scope = ".".join(prefix)
                where = f"[{scope}]" if scope else "the top level"
                allowed = sorted(
                    {
                        f[len(scope) + 1 :].split(".")[0] if scope else f.split(".")[0]
                        for f in (*FIELDS, *TABLES)
                        if not scope or f.startswith(scope + ".")
                    }
                )
                add(path, f"unknown field {dotted} (allowed in {where}: {', '.join(allowed)})")

    walk(raw, ())

    # tables must be tables
    for t in TABLES:
        found, v = get(tuple(t.split(".")))
        if found and not isinstance(v, dict):
            add(tuple(t.split(".")), f"{t} must be a table (got {_type_name(v)} {v!r})")

    # required fields: presence, type, value
    missing_tables: set[tuple[str, ...]] = set()
    for dotted, (kind, check) in FIELDS.items():
        path = tuple(dotted.split("."))
        found, v = get(path)
        if not found:
            parent_found, parent = get(path[:-1])
            if parent_found and not isinstance(parent, dict):
                continue  # reported above
            if not parent_found:
                if path[:-1] not in missing_tables:
                    missing_tables.add(path[:-1])
                    add(path[:-1], f"missing table [{'.'.join(path[:-1])}]", 1)
                continue
            table = f"[{'.'.join(path[:-1])}]" if len(path) > 1 else "the top level"
            add(path, f"missing field {dotted} ({_KIND_WORDS[kind]} in {table})", 1)
            continue
        if not _kind_ok(kind, v):
            add(path, f"{dotted} must be {_KIND_WORDS[kind]} (got {_type_name(v)} {v!r})")
            continue
        if kind is NUMBER and not math.isfinite(v):
            add(path, f"{dotted} must be a finite number (got {v})")
            continue
        if check is not None and (msg := check(v)) is not None:
            add(path, f"{dotted} must {msg}")

    # optional time figures: [compute.throughput] engine -> {dtype: GFLOP/s}, [compute.op_overhead_us]
    found, rates = get(("compute", "throughput"))
    if found:
        if not isinstance(rates, dict):
            add(
                ("compute", "throughput"),
                f"compute.throughput must be a table (got {_type_name(rates)} {rates!r})",
            )
        else:
            for e, v in rates.items():
                path = ("compute", "throughput", e)
                if e not in ENGINES:
                    add(path, f"unknown engine compute.throughput.{e} (engines: {', '.join(ENGINES)})")
                elif not isinstance(v, dict) or not v:
                    add(path, f"compute.throughput.{e} must be a table of dtype = GFLOP/s (got {v!r})")
                else:
                    for dt, x in v.items():
                        if dt not in DTYPES:
                            add(
                                path,
                                f"compute.throughput.{e}.{dt}: unknown dtype (dtypes: {', '.join(DTYPES)})",
                            )
                        elif not _kind_ok(NUMBER, x) or not math.isfinite(x) or x <= 0:
                            add(
                                path,
                                f"compute.throughput.{e}.{dt} must be a positive number (GFLOP/s; got {x!r})",
                            )
    found, over = get(("compute", "op_overhead_us"))
    if found:
        if not isinstance(over, dict):
            add(
                ("compute", "op_overhead_us"),
                f"compute.op_overhead_us must be a table (got {_type_name(over)} {over!r})",
            )
        else:
            for r, x in over.items():
                path = ("compute", "op_overhead_us", r)
                if r not in RUNTIMES:
                    add(path, f"unknown runtime compute.op_overhead_us.{r} (runtimes: {', '.join(RUNTIMES)})")
                elif not _kind_ok(NUMBER, x) or not math.isfinite(x) or x < 0:
                    add(path, f"compute.op_overhead_us.{r} must be a number >= 0 (microseconds; got {x!r})")

    # [compute.dtypes]
    found, engines = get(("compute", "dtypes"))
    if not found:
        if isinstance(raw.get("compute"), dict):
            add(("compute",), "missing table [compute.dtypes] (engine -> list of dtypes)", 1)
    elif isinstance(engines, dict):
        if not any(e in ENGINES for e in engines):
            add(("compute", "dtypes"), f"compute.dtypes must list at least one engine ({', '.join(ENGINES)})")
        for e, v in engines.items():
            if e not in ENGINES:
                continue
            path = ("compute", "dtypes", e)
            if not isinstance(v, list):
                add(path, f"compute.dtypes.{e} must be a list (got {_type_name(v)} {v!r})")
            elif (msg := ENGINE_CHECK(v)) is not None:
                add(path, f"compute.dtypes.{e} must {msg}")

    # cross-field checks, only when the fields themselves are fine
    if not problems:
        m = raw["memory"]
        if m["budget_gib"] > m["ram_gib"]:
            add(
                ("memory", "budget_gib"),
                f"memory.budget_gib must be <= memory.ram_gib (got {m['budget_gib']} > {m['ram_gib']})",
            )
        fixed_mib = m["runtime_overhead_mib"] + m["cuda_context_mib"] + m["safety_margin_mib"]
        if fixed_mib * MIB >= m["budget_gib"] * GIB:
            add(
                ("memory", "budget_gib"),
                "memory.budget_gib must exceed the fixed overheads "
                f"(runtime_overhead_mib + cuda_context_mib + safety_margin_mib = {fixed_mib} MiB)",
            )
        default = raw["compute"]["default_dtype"]
        if not any(default in v for v in raw["compute"]["dtypes"].values()):
            add(
                ("compute", "default_dtype"),
                f"compute.default_dtype {default!r} must be listed by "
                "at least one engine in [compute.dtypes]",
            )
    return [(line, msg) for _, line, msg in sorted(problems, key=lambda p: p[:2])]


# --------------------------------------------------------------------------------------------------
# the profile
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    name: str
    description: str
    ram_gib: float
    budget_gib: float
    dtype: str  # compute.default_dtype
    backends: tuple[str, ...]
    raw: dict[str, Any] = field(hash=False, repr=False)
    runtime_overhead_mib: float = 0.0
    cuda_context_mib: float = 0.0
    allocator_slack: float = 0.0
    safety_margin_mib: float = 0.0
    alloc_round_bytes: int = 1
    bandwidth_gbs: float = 0.0
    cache_budget_gib: float = 0.0
    storage_read_mbs: float = 0.0
    dtypes: dict[str, tuple[str, ...]] = field(default_factory=dict, hash=False)
    source: str = ""  # where it was loaded from, for messages
    # time figures (optional): engine -> dtype -> GFLOP/s; runtime -> microseconds per op
    throughput: dict[str, dict[str, float]] = field(default_factory=dict, hash=False)
    op_overhead_us: dict[str, float] = field(default_factory=dict, hash=False)

    @property
    def budget_bytes(self) -> int:
        return int(self.budget_gib * GIB)

    @property
    def fixed_overhead_bytes(self) -> int:
        """Runtime library + CUDA context + safety margin, in bytes."""
        return int((self.runtime_overhead_mib + self.cuda_context_mib + self.safety_margin_mib) * MIB)

    @property
    def cache_budget_bytes(self) -> int:
        return int(self.cache_budget_gib * GIB)

    def round_alloc(self, nbytes: int) -> int:
        """Bytes one allocation of ``nbytes`` really takes (rounded up to ``alloc_round_bytes``)."""
        r = self.alloc_round_bytes
        return -(-int(nbytes) // r) * r

    def predicted_bytes(self, allocations: Iterable[int]) -> int:
        """Process memory for these live tensor allocations: fixed overheads plus the rounded
        allocations grown by ``allocator_slack``. The dry run compares this with ``budget_bytes``."""
        tensors = sum(self.round_alloc(n) for n in allocations)
        return self.fixed_overhead_bytes + math.ceil(tensors * (1.0 + self.allocator_slack))

    def supports(self, dtype: str, engine: str | None = None) -> bool:
        """Whether ``engine`` (or any engine) computes in ``dtype``."""
        if engine is not None:
            return dtype in self.dtypes.get(engine, ())
        return any(dtype in v for v in self.dtypes.values())


def _from_raw(raw: dict[str, Any], source: str) -> Profile:
    m, s, c = raw["memory"], raw["storage"], raw["compute"]
    return Profile(
        name=raw["name"],
        description=raw["description"],
        ram_gib=float(m["ram_gib"]),
        budget_gib=float(m["budget_gib"]),
        dtype=c["default_dtype"],
        backends=tuple(raw["backends"]["available"]),
        raw=raw,
        runtime_overhead_mib=float(m["runtime_overhead_mib"]),
        cuda_context_mib=float(m["cuda_context_mib"]),
        allocator_slack=float(m["allocator_slack"]),
        safety_margin_mib=float(m["safety_margin_mib"]),
        alloc_round_bytes=int(m["alloc_round_bytes"]),
        bandwidth_gbs=float(m["bandwidth_gbs"]),
        cache_budget_gib=float(s["cache_budget_gib"]),
        storage_read_mbs=float(s["read_mbs"]),
        dtypes={e: tuple(v) for e, v in c["dtypes"].items()},
        source=source,
        throughput={e: {d: float(x) for d, x in v.items()} for e, v in c.get("throughput", {}).items()},
        op_overhead_us={r: float(x) for r, x in c.get("op_overhead_us", {}).items()},
    )


def profile_of_bundle(manifest: dict[str, Any]) -> Profile:
    """The profile a bundle was exported for (its manifest keeps the profile's full, validated table)."""
    return _from_raw(manifest["profile"], "the bundle's manifest")


def available_profiles() -> list[str]:
    root = resources.files("blockskip.profiles")
    return sorted(p.name[: -len(".toml")] for p in root.iterdir() if p.name.endswith(".toml"))


_TOML_LINE_RE = re.compile(r"\(at line (\d+), column \d+\)")


def parse_profile(text: str, where: str) -> Profile:
    """Parse and validate profile text; ``where`` names the file in error messages."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = _TOML_LINE_RE.search(str(e))
        loc = f"{where} line {m.group(1)}" if m else where
        raise ProfileError(f"{loc}: invalid TOML: {e}") from e
    problems = validate(raw, text)
    if problems:
        line, msg = problems[0]
        more = f" ({len(problems) - 1} more problem(s) after this one)" if len(problems) > 1 else ""
        raise ProfileError(f"{where} line {line}: {msg}{more}")
    return _from_raw(raw, where)


def load_profile(name_or_path: str | Path) -> Profile:
    """A shipped profile by name (see ``available_profiles()``) or a ``.toml`` file by path."""
    s = str(name_or_path)
    p = Path(s)
    if p.suffix == ".toml" or "/" in s or "\\" in s:
        if not p.is_file():
            raise ProfileError(f"profile file not found: {s}")
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ProfileError(f"cannot read profile {s}: {e}") from e
        return parse_profile(text, s)
    res = resources.files("blockskip.profiles") / f"{s}.toml"
    if not s or not res.is_file():
        raise ProfileError(
            f"unknown profile {s!r}; available: {', '.join(available_profiles())} "
            "(or give a path to a .toml file)"
        )
    return parse_profile(res.read_text(encoding="utf-8"), f"profiles/{s}.toml")
