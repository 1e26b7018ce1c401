"""Property tests for the patch schedule (numpy only) and for Plan validation."""

import json
from itertools import pairwise

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from blockskip.runtime.errors import PlanError
from blockskip.runtime.plan import Plan
from blockskip.runtime.schedule import PatchSchedule, crop_side

FAST = settings(max_examples=60, deadline=None)


@st.composite
def sizes(draw):
    """(granularity, s_min, s_max, T): s_min <= s_max, both multiples of the granularity."""
    g = draw(st.sampled_from([1, 2, 4, 8, 16, 32]))
    a = draw(st.integers(1, 24))
    b = draw(st.integers(a, 48))
    T = draw(st.integers(1, 1000))
    return g, a * g, b * g, T


@st.composite
def schedules(draw, patch_sampling=None):
    g, s_min, s_max, T = draw(sizes())
    kw = dict(
        num_images=draw(st.integers(1, 8)),
        num_samples=draw(st.integers(0, 40)),
        s_min=s_min,
        s_max=s_max,
        granularity=g,
        seed=draw(st.integers(0, 2**32 - 1)),
        patch_sampling=draw(st.booleans()) if patch_sampling is None else patch_sampling,
        shift=draw(st.floats(0.05, 20.0, allow_nan=False)),
        T=T,
    )
    return kw


# --------------------------------------------------------------------------------------------
# crop_side


@FAST
@given(sizes(), st.data())
def test_crop_side_is_monotone_bounded_and_on_the_grid(sz, data):
    g, s_min, s_max, T = sz
    t1 = data.draw(st.integers(1, T))
    t2 = data.draw(st.integers(t1, T))
    a, b = (crop_side(t, T, s_min, s_max, g) for t in (t1, t2))
    assert a <= b
    for s in (a, b):
        assert s_min <= s <= s_max
        assert s % g == 0


@FAST
@given(sizes())
def test_crop_side_sweeps_the_whole_range(sz):
    g, s_min, s_max, T = sz
    sides = [crop_side(t, T, s_min, s_max, g) for t in range(1, T + 1)]
    assert sides == sorted(sides)
    assert sides[-1] == s_max  # the largest timestep sees the whole photo
    assert all(s_min <= s <= s_max and s % g == 0 for s in sides)


# --------------------------------------------------------------------------------------------
# PatchSchedule


@FAST
@given(schedules())
def test_every_crop_lies_inside_the_photo_on_the_grid(kw):
    sched = PatchSchedule.build(**kw)
    assert len(sched) == kw["num_samples"]
    g, s_min, s_max = kw["granularity"], kw["s_min"], kw["s_max"]
    for k, e in enumerate(sched.entries):
        assert e.index == k and sched[k] == e
        assert 0 <= e.image < kw["num_images"]
        assert 1 <= e.t <= kw["T"]
        assert s_min <= e.side <= s_max and e.side % g == 0
        assert e.top % g == 0 and e.left % g == 0
        assert 0 <= e.top and e.top + e.side <= s_max
        assert 0 <= e.left and e.left + e.side <= s_max
        assert 0 <= e.noise_seed < 2**31
        if kw["patch_sampling"]:
            assert e.side == crop_side(e.t, kw["T"], s_min, s_max, g)


@FAST
@given(schedules(patch_sampling=True))
def test_side_is_monotone_in_t_within_a_schedule(kw):
    entries = sorted(PatchSchedule.build(**kw).entries, key=lambda e: e.t)
    sides = [e.side for e in entries]
    assert sides == sorted(sides)


@FAST
@given(schedules(patch_sampling=False))
def test_without_patch_sampling_the_crop_is_the_whole_photo(kw):
    for e in PatchSchedule.build(**kw).entries:
        assert e.side == kw["s_max"]
        assert e.top == 0 and e.left == 0


@FAST
@given(schedules())
def test_same_seed_gives_the_same_schedule(kw):
    a, b = PatchSchedule.build(**kw), PatchSchedule.build(**kw)
    assert a.entries == b.entries
    assert a.to_json() == b.to_json()


@FAST
@given(schedules(), st.integers(0, 2**32 - 1))
def test_another_seed_gives_another_schedule(kw, other):
    if other == kw["seed"] or kw["num_samples"] < 2:
        return
    a = PatchSchedule.build(**kw)
    b = PatchSchedule.build(**{**kw, "seed": other})
    # noise seeds alone are 31-bit draws: a collision of every entry is practically impossible
    assert a.entries != b.entries


@FAST
@given(schedules())
def test_json_round_trip(kw):
    a = PatchSchedule.build(**kw)
    d = json.loads(json.dumps(a.to_json()))
    b = PatchSchedule.from_json(d)
    assert b.entries == a.entries
    assert b.meta == a.meta
    assert b.to_json() == a.to_json()
    # the meta is enough to rebuild the very same schedule (this is what precompute does)
    meta = {k: v for k, v in d["meta"].items() if k != "resize"}  # rng included
    assert PatchSchedule.build(num_samples=len(a), **meta).entries == a.entries


@FAST
@given(schedules())
def test_every_image_is_used_when_there_are_enough_samples(kw):
    sched = PatchSchedule.build(**kw)
    used = {e.image for e in sched.entries}
    if kw["num_samples"] >= kw["num_images"]:
        assert used == set(range(kw["num_images"]))
    else:
        assert used == set(range(kw["num_samples"]))


@FAST
@given(schedules())
# sigma(t = T) = shift / (1 + (shift - 1)) rounds above 1 for these shifts (found by this test)
@example(
    dict(
        num_images=1,
        num_samples=2,
        s_min=32,
        s_max=64,
        granularity=16,
        seed=0,
        patch_sampling=True,
        shift=0.1,
        T=1,
    )
)
@example(
    dict(
        num_images=1,
        num_samples=2,
        s_min=32,
        s_max=64,
        granularity=16,
        seed=0,
        patch_sampling=True,
        shift=0.45,
        T=1,
    )
)
def test_sigma_is_in_unit_interval_and_increasing_in_t(kw):
    sched = PatchSchedule.build(**kw)
    for e in sched.entries:
        assert 0.0 < e.sigma <= 1.0, (e.t, kw["shift"], e.sigma)
    by_t = {}
    for e in sched.entries:
        by_t.setdefault(e.t, set()).add(e.sigma)
    assert all(len(v) == 1 for v in by_t.values())  # sigma is a function of t
    sig = [by_t[t].pop() for t in sorted(by_t)]
    assert all(x < y for x, y in pairwise(sig))


@FAST
@given(st.floats(0.05, 20.0), st.integers(2, 1000))
def test_sigma_over_all_timesteps(shift, T):
    """Every timestep 1..T of one schedule build: sigma strictly increasing and in (0, 1]."""
    sched = PatchSchedule.build(
        num_images=1, num_samples=1, s_min=8, s_max=8, granularity=8, seed=0, shift=shift, T=T
    )
    from blockskip.runtime.schedule import shift_sigma

    sig = [shift_sigma(t / T, shift) for t in range(1, T + 1)]
    assert sched[0].sigma == sig[sched[0].t - 1]
    assert all(x < y for x, y in pairwise(sig))
    assert sig[0] > 0.0
    assert sig[-1] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "bad",
    [
        dict(num_images=0),
        dict(s_min=128, s_max=64),
        dict(s_min=0),
        dict(s_min=24),  # not a multiple of 16
        dict(s_max=72),
    ],
)
def test_build_refuses_bad_sizes(bad):
    kw = dict(num_images=2, num_samples=4, s_min=32, s_max=64, granularity=16, seed=0) | bad
    with pytest.raises(PlanError):
        PatchSchedule.build(**kw)


# --------------------------------------------------------------------------------------------
# Plan validation

TARGETS = {"attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"}


def test_plan_accepts_a_good_split():
    assert Plan(front_skip=1, back_skip=2, s_min=32, s_max=64).validate(6, 16, TARGETS) == [1, 2, 3]
    assert Plan(trained=[4, 1, 1]).validate(6, 16) == [1, 4]


@FAST
@given(st.integers(1, 40), st.data())
def test_plan_refuses_splits_that_leave_no_block(L, data):
    n = data.draw(st.integers(0, L))
    m = data.draw(st.integers(max(0, L - n), L + 2))
    with pytest.raises(PlanError) as ei:
        Plan(front_skip=n, back_skip=m).validate(L, 16)
    msg = str(ei.value)
    assert f"at most {L - 1}" in msg and f"{L} blocks" in msg


@FAST
@given(st.integers(1, 40), st.data())
def test_plan_accepts_every_split_that_fits(L, data):
    n = data.draw(st.integers(0, L - 1))
    m = data.draw(st.integers(0, L - 1 - n))
    assert Plan(front_skip=n, back_skip=m).trained_indices(L) == list(range(n, L - m))


def test_plan_refuses_negative_skips():
    with pytest.raises(PlanError, match=">= 0"):
        Plan(front_skip=-1).validate(6, 16)


def test_plan_refuses_s_min_above_s_max():
    with pytest.raises(PlanError, match=r"s_min \(128\) must be <= s_max \(64\)"):
        Plan(s_min=128, s_max=64).validate(6, 16)


def test_plan_refuses_sizes_off_the_granularity():
    with pytest.raises(PlanError) as ei:
        Plan(s_min=40, s_max=64).validate(6, 16)
    msg = str(ei.value)
    assert "s_min" in msg and "16" in msg and "try 32" in msg
    with pytest.raises(PlanError, match="s_max"):
        Plan(s_min=32, s_max=72).validate(6, 16)
    with pytest.raises(PlanError, match="s_min"):
        Plan(s_min=0, s_max=64).validate(6, 16)


def test_plan_refuses_unknown_lora_targets_listing_valid_ones():
    with pytest.raises(PlanError) as ei:
        Plan(lora_targets=["attn.to_q", "bogus"]).validate(6, 16, TARGETS)
    msg = str(ei.value)
    assert "bogus" in msg
    for t in TARGETS:
        assert t in msg
    # without a list of valid targets there is nothing to check against
    Plan(lora_targets=["bogus"]).validate(6, 16, None)


@pytest.mark.parametrize("trained", [[6], [-1], [0, 7], [2, 100]])
def test_plan_refuses_trained_indices_out_of_range(trained):
    with pytest.raises(PlanError) as ei:
        Plan(trained=trained).validate(6, 16)
    assert "0..5" in str(ei.value)


def test_plan_refuses_empty_trained_list():
    with pytest.raises(PlanError, match="empty"):
        Plan(trained=[]).validate(6, 16)


@pytest.mark.parametrize(
    "field,value",
    [
        ("lora_rank", 0),
        ("num_samples", 0),
        ("steps", 0),
        ("grad_accum", 0),
        ("checkpoint_every", 0),
        ("precompute_chunk", -1),
        ("positions", "diagonal"),
        ("dtype", "int8"),
        ("timestep_shift", 0.0),
    ],
)
def test_plan_refuses_other_bad_fields(field, value):
    with pytest.raises(PlanError):
        Plan(**{field: value}).validate(6, 16)


def test_plan_dict_round_trip_and_unknown_fields():
    p = Plan(front_skip=1, back_skip=2, lora_targets=["attn.to_q"], extra={"a": 1})
    assert Plan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    with pytest.raises(PlanError, match="front_skipp"):
        Plan.from_dict({"front_skipp": 1})


def test_a_schedule_of_another_generator_is_refused():
    with pytest.raises(PlanError, match="generator"):
        PatchSchedule.build(
            num_images=2, num_samples=3, s_min=32, s_max=64, granularity=16, seed=0, rng="pcg64"
        )
