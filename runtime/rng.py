"""The one random-number definition of the schedule and the noise (numpy only), ``splitmix64-v1``.

A counter-based generator: every value is a pure function of (key, counter), so any side can compute
any draw without replaying the ones before it, and the Python runtime and the native runner (which
implements the same functions in ``device_train/native/rng.cpp``) make the same schedule and the same
noise. Specified in
``docs/formats.md`` ("Random numbers"); all arithmetic on unsigned 64-bit integers wraps mod 2^64.

* ``mix(z)``: SplitMix64's finaliser, ``z ^= z >> 30; z *= 0xbf58476d1ce4e5b9; z ^= z >> 27;
  z *= 0x94d049bb133111eb; z ^= z >> 31``.
* ``key(seed, stream) = mix(mix(seed) ^ stream)``: one independent sequence per (seed, stream).
* ``word(key, i) = mix(key + (i + 1) * 0x9e3779b97f4a7c15)``: the i-th 64-bit value of a sequence
  (with key 0 these are SplitMix64's outputs from state 0: 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4, ...).
* ``below(w, n) = ((w >> 32) * n) >> 32``: an integer in [0, n) for 1 <= n <= 2^32 (exact integer
  arithmetic; the bias, at most n / 2^32, is far below anything a schedule can show).
* ``normals(seed, n)``: Box-Muller on consecutive word pairs of ``key(seed, NOISE_STREAM)``:
  ``u1 = ((word(2j) >> 11) + 1) * 2^-53`` in (0, 1], ``u2 = (word(2j+1) >> 11) * 2^-53``,
  ``r = sqrt(-2 ln u1)``, value 2j = ``r cos(2 pi u2)``, value 2j+1 = ``r sin(2 pi u2)``, computed in
  float64 and rounded to float32 (the last value of an odd count drops its sine).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

GAMMA = 0x9E3779B97F4A7C15
M1 = 0xBF58476D1CE4E5B9
M2 = 0x94D049BB133111EB
MASK = (1 << 64) - 1
SCHEDULE_STREAM = 1  # the patch schedule's draws
NOISE_STREAM = 2  # a schedule entry's Gaussian noise (keyed by its noise_seed)


U64 = npt.NDArray[np.uint64]


def mix(z: U64 | np.uint64) -> U64:
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(M1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(M2)
    return z ^ (z >> np.uint64(31))


def key(seed: int, stream: int) -> int:
    """The key of stream ``stream`` of ``seed`` (both taken mod 2^64)."""
    return int(mix(np.uint64(int(mix(np.uint64(seed & MASK))) ^ (stream & MASK))))


def words(k: int, start: int, count: int) -> U64:
    """``word(k, i)`` for i in [start, start + count), as uint64."""
    i = np.arange(start, start + count, dtype=np.uint64) + np.uint64(1)
    with np.errstate(over="ignore"):
        return mix(np.uint64(k & MASK) + i * np.uint64(GAMMA))


def below(w: U64 | int, n: int) -> U64:
    """Integers in [0, n) from words ``w`` (1 <= n <= 2^32)."""
    if not 1 <= n <= 1 << 32:
        raise ValueError(f"below(): n must be in [1, 2^32], got {n}")
    w = np.asarray(w, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return ((w >> np.uint64(32)) * np.uint64(n)) >> np.uint64(32)


def normals(seed: int, n: int) -> npt.NDArray[np.float32]:
    """``n`` standard normal float32 values of the noise sequence of ``seed``."""
    pairs = (n + 1) // 2
    w = words(key(seed, NOISE_STREAM), 0, 2 * pairs)
    u1 = ((w[0::2] >> np.uint64(11)) + np.uint64(1)).astype(np.float64) * 2.0**-53
    u2 = (w[1::2] >> np.uint64(11)).astype(np.float64) * 2.0**-53
    r = np.sqrt(-2.0 * np.log(u1))
    a = 2.0 * np.pi * u2
    out = np.empty(2 * pairs, dtype=np.float64)
    out[0::2] = r * np.cos(a)
    out[1::2] = r * np.sin(a)
    return out[:n].astype(np.float32)
