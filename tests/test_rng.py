"""The counter-based generator (``runtime.rng``, ``splitmix64-v1``) that the schedule and the noise come
from, against a plain-integer reference of SplitMix64 written here from its published definition."""

import math

import numpy as np
import pytest

from blockskip.runtime import rng
from blockskip.runtime.schedule import WORDS_PER_ENTRY, PatchSchedule

M = (1 << 64) - 1


def ref_mix(z: int) -> int:
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
    return z ^ (z >> 31)


def ref_splitmix64(state: int, n: int) -> list[int]:
    """SplitMix64 as published: the state advances by the golden gamma, each output is mix(state)."""
    out = []
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & M
        out.append(ref_mix(state))
    return out


def test_words_are_splitmix64_from_the_key():
    # the well-known first outputs of SplitMix64 from state 0
    assert [int(w) for w in rng.words(0, 0, 4)] == [
        0xE220A8397B1DCDAF,
        0x6E789E6AA1B965F4,
        0x06C45D188009454F,
        0xF88BB8A8724C81EC,
    ]
    for seed, stream in ((0, 1), (7, 2), (2**32 - 1, 1), (123456789, 9)):
        k = rng.key(seed, stream)
        assert k == ref_mix(ref_mix(seed) ^ stream)
        assert [int(w) for w in rng.words(k, 0, 50)] == ref_splitmix64(k, 50)
        # counter-based: any window is the same values, with no replay
        assert [int(w) for w in rng.words(k, 37, 5)] == ref_splitmix64(k, 42)[37:]


def test_below_is_the_multiply_shift_of_the_high_word():
    ws = rng.words(rng.key(3, 1), 0, 1000)
    for n in (1, 2, 3, 7, 1000, 2**32):
        got = rng.below(ws, n)
        assert [int(g) for g in got] == [((int(w) >> 32) * n) >> 32 for w in ws]
        assert got.min() >= 0 and got.max() < n
    counts = np.bincount(rng.below(rng.words(rng.key(5, 1), 0, 60000), 6).astype(np.int64), minlength=6)
    assert counts.min() > 9000 and counts.max() < 11000  # about 10000 each
    with pytest.raises(ValueError):
        rng.below(ws, 0)


def test_normals_are_box_muller_of_word_pairs():
    n = 9
    z = rng.normals(42, n)
    assert z.dtype == np.float32 and z.shape == (n,)
    w = ref_splitmix64(rng.key(42, rng.NOISE_STREAM), 10)
    for j in range(5):
        u1 = ((w[2 * j] >> 11) + 1) * 2.0**-53
        u2 = (w[2 * j + 1] >> 11) * 2.0**-53
        r = math.sqrt(-2 * math.log(u1))
        assert z[2 * j] == np.float32(r * math.cos(2 * math.pi * u2))
        if 2 * j + 1 < n:
            assert z[2 * j + 1] == np.float32(r * math.sin(2 * math.pi * u2))
    big = rng.normals(1, 200_000)
    assert abs(float(big.mean())) < 0.01 and abs(float(big.std()) - 1) < 0.01
    assert np.isfinite(big).all()
    np.testing.assert_array_equal(rng.normals(1, 7), big[:7])  # a prefix is the same values


def test_schedule_draws_follow_the_documented_words():
    kw = dict(num_images=3, num_samples=12, s_min=32, s_max=96, granularity=16, seed=2024, T=1000)
    sched = PatchSchedule.build(**kw)
    assert sched.meta["rng"] == "splitmix64-v1"
    k = rng.key(2024, rng.SCHEDULE_STREAM)
    for e in sched.entries:
        w = ref_splitmix64(k, WORDS_PER_ENTRY * (e.index + 1))[WORDS_PER_ENTRY * e.index :]
        below = lambda x, n: ((x >> 32) * n) >> 32  # noqa: E731
        assert e.image == (e.index if e.index < 3 else below(w[0], 3))
        assert e.t == 1 + below(w[1], 1000)
        slots = (96 - e.side) // 16 + 1
        assert (e.top, e.left) == (below(w[2], slots) * 16, below(w[3], slots) * 16)
        assert e.noise_seed == w[4] >> 33
