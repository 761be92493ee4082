"""pipelines.splits: each site's training / validation / test split (pure Python)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from pipelines.splits import (
    MIN_CASES_FOR_HELD_OUT,
    SPLITS,
    SplitIndices,
    SplitSettings,
    assign_splits,
    block_layout,
    case_unit,
    split_indices,
)


def _numbered(numbers) -> list[str]:
    return [f"case_{k:04d}" for k in numbers]


def _counts(assigned: dict[str, str]) -> dict[str, int]:
    c = Counter(assigned.values())
    return {name: c.get(name, 0) for name in SPLITS}


# --------------------------------------------------------------------------- settings


def test_settings_defaults_mapping_and_dict():
    assert SplitSettings() == SplitSettings(validation=0.2, test=0.2, seed=0)
    assert SplitSettings.from_mapping(None) == SplitSettings()
    assert SplitSettings.from_mapping({"test": 0.1}) == SplitSettings(validation=0.2, test=0.1, seed=0)
    s = SplitSettings(validation=0.25, test=0, seed=3)
    assert s.to_dict() == {"validation": 0.25, "test": 0, "seed": 3}
    assert SplitSettings.from_mapping(s.to_dict()) == s


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"validation": -0.1}, "split.validation: must be a number in [0, 1)"),
        ({"validation": 1.0, "test": 0.0}, "split.validation: must be a number in [0, 1)"),
        ({"test": 1.5}, "split.test: must be a number in [0, 1)"),
        ({"test": True}, "split.test: must be a number"),
        ({"validation": "0.2"}, "split.validation: must be a number"),
        ({"validation": 0.5, "test": 0.5}, "split: validation + test must be below 1"),
        ({"validation": 0.6, "test": 0.45}, "split: validation + test must be below 1"),
        ({"seed": -1}, "split.seed: must be an integer >= 0"),
        ({"seed": 1.5}, "split.seed: must be an integer >= 0"),
        ({"seed": True}, "split.seed: must be an integer >= 0"),
    ],
)
def test_settings_refuse_values_out_of_range(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        SplitSettings(**kwargs)
    assert str(info.value).startswith(fragment)


def test_from_mapping_refuses_unknown_keys():
    with pytest.raises(ValueError, match=r"^split: unknown key\(s\) ratio, valid \(known: validation, test, seed\)$"):
        SplitSettings.from_mapping({"valid": 0.2, "ratio": 0.1})


# --------------------------------------------------------------------------- block layout


@pytest.mark.parametrize(
    "validation, test, size, n_val, n_test",
    [
        (0.2, 0.2, 5, 1, 1),
        (0.25, 0.25, 4, 1, 1),
        (0.1, 0.2, 10, 1, 2),
        (0.15, 0.15, 20, 3, 3),
        (0.0, 0.0, 1, 0, 0),
        (0.5, 0.0, 2, 1, 0),
        (0.33, 0.0, 100, 33, 0),
    ],
)
def test_block_layout_is_the_smallest_block_with_whole_shares(validation, test, size, n_val, n_test):
    layout = block_layout(SplitSettings(validation=validation, test=test))
    assert len(layout) == size
    assert Counter(layout) == Counter({"validation": n_val, "test": n_test, "training": size - n_val - n_test}) - Counter()


# --------------------------------------------------------------------------- numbered case ids


def test_deterministic_disjoint_complete_and_independent_of_order():
    ids = _numbered(range(37))
    s = SplitSettings(validation=0.2, test=0.2, seed=5)
    a = assign_splits(ids, s)
    assert a == assign_splits(list(ids), s) == assign_splits(list(reversed(ids)), s)
    assert set(a) == set(ids) and set(a.values()) <= set(SPLITS)
    idx = split_indices(ids, s)
    positions = idx.training + idx.validation + idx.test
    assert sorted(positions) == list(range(len(ids)))  # disjoint and complete
    assert all(a[ids[i]] == name for name in SPLITS for i in getattr(idx, name))
    assert all(getattr(idx, name) == sorted(getattr(idx, name)) for name in SPLITS)  # dataset order
    assert idx.counts() == _counts(a)


def test_split_indices_follow_the_given_order():
    ids = _numbered(range(10))
    s = SplitSettings(validation=0.2, test=0.2)
    shuffled = ids[::-1]
    idx = split_indices(shuffled, s)
    a = assign_splits(ids, s)
    assert {shuffled[i] for i in idx.test} == {c for c in ids if a[c] == "test"}
    assert isinstance(idx, SplitIndices)


def test_another_split_seed_moves_cases_of_a_large_site():
    ids = _numbered(range(200))
    base = assign_splits(ids, SplitSettings(seed=0))
    for seed in (1, 2, 3):
        other = assign_splits(ids, SplitSettings(seed=seed))
        assert other != base
        assert _counts(other) == _counts(base) == {"training": 120, "validation": 40, "test": 40}


@pytest.mark.parametrize("validation, test", [(0.2, 0.2), (0.25, 0.25), (0.1, 0.2), (0.15, 0.05), (0.3, 0.0), (0.0, 0.0)])
@pytest.mark.parametrize("seed", [0, 1, 17])
def test_every_full_block_has_the_exact_shares(validation, test, seed):
    s = SplitSettings(validation=validation, test=test, seed=seed)
    size = len(block_layout(s))
    n_blocks = 7
    a = assign_splits(_numbered(range(size * n_blocks)), s)
    for b in range(n_blocks):
        block = {c: a[c] for c in _numbered(range(b * size, (b + 1) * size))}
        assert _counts(block) == {
            "test": round(size * test),
            "validation": round(size * validation),
            "training": size - round(size * test) - round(size * validation),
        }


def test_a_phantom_site_of_four_cases_has_two_training_one_validation_one_test():
    for seed in range(20):
        a = assign_splits(_numbered(range(4)), SplitSettings(validation=0.25, test=0.25, seed=seed))
        assert _counts(a) == {"training": 2, "validation": 1, "test": 1}


def _reference(settings: SplitSettings, top: int) -> dict[str, str]:
    """Each number's split in a site that has all of them (every block has training cases)."""
    return assign_splits(_numbered(range(top)), settings)


def test_numbered_split_of_any_subset_is_the_reference_split_so_no_case_ever_moves():
    rng = random.Random(20261205)
    for trial in range(300):
        s = SplitSettings(validation=rng.choice([0.1, 0.2, 0.25, 0.3]), test=rng.choice([0.0, 0.1, 0.2, 0.25]), seed=rng.randrange(1000))
        ref = _reference(s, 400)
        numbers = rng.sample(range(400), rng.randint(1, 60))
        ids = _numbered(numbers)
        got = assign_splits(ids, s)
        expected = {c: ref[c] for c in ids}
        if "training" not in expected.values():  # a site smaller than a block that would train on none
            expected[max(ids)] = "training"
        assert got == expected, (trial, s, numbers)


def test_adding_or_removing_other_numbered_cases_never_moves_an_existing_case():
    rng = random.Random(7)
    checked = 0
    for _ in range(300):
        s = SplitSettings(validation=rng.choice([0.2, 0.25]), test=rng.choice([0.1, 0.2, 0.25]), seed=rng.randrange(50))
        site = set(rng.sample(range(300), rng.randint(8, 40)))
        before = assign_splits(_numbered(sorted(site)), s)
        added = site | set(rng.sample(range(300), rng.randint(1, 20)))
        removed = set(rng.sample(sorted(site), len(site) // 2))
        for other in (added, removed):
            after = assign_splits(_numbered(sorted(other)), s)
            if "training" in {before[c] for c in _numbered(sorted(other & site))}:  # neither set is a tiny repaired site
                assert all(after[c] == before[c] for c in _numbered(sorted(other & site)))
                checked += 1
    assert checked > 500


def test_a_site_smaller_than_a_block_still_trains():
    for seed in range(50):
        for n in range(1, 5):
            a = assign_splits(_numbered(range(n)), SplitSettings(validation=0.2, test=0.2, seed=seed))
            assert "training" in a.values()


def test_duplicate_case_ids_are_refused():
    with pytest.raises(ValueError, match="distinct"):
        assign_splits(["case_0001", "case_0001"], SplitSettings())


def test_no_held_out_share_trains_on_everything():
    for ids in (_numbered(range(13)), [f"p{i}" for i in range(13)]):
        assert set(assign_splits(ids, SplitSettings(validation=0.0, test=0.0)).values()) == {"training"}


# --------------------------------------------------------------------------- hashed fallback


def _raw_hashed(ids, s: SplitSettings) -> dict[str, str]:
    """The cut of each id's unit at the shares, before any repair."""
    out = {}
    for c in ids:
        u = case_unit(c, s.seed)
        out[c] = "test" if u < s.test else "validation" if u < s.test + s.validation else "training"
    return out


def _needs_no_repair(raw: dict[str, str], s: SplitSettings) -> bool:
    present = set(raw.values())
    if "training" not in present:
        return False
    if len(raw) < MIN_CASES_FOR_HELD_OUT:
        return True
    return all(getattr(s, name) == 0 or name in present for name in ("test", "validation"))


def test_ids_of_another_form_use_the_hashed_split():
    ids = ["case_0001", "patient-7"]  # not all numbered
    s = SplitSettings(validation=0.2, test=0.2, seed=1)
    assert 0.0 <= case_unit("patient-7", 1) < 1.0 and case_unit("patient-7", 1) != case_unit("patient-7", 2)
    many = [f"site-{i}" for i in range(50)] + ids
    assert assign_splits(many, s) == _raw_hashed(many, s)  # a site this large needs no repair
    assert assign_splits(["case_1", "case_01"], s) == assign_splits(["case_1", "case_01"], s)  # same number twice: hashed


def test_hashed_shares_are_roughly_right_for_a_large_site():
    ids = [f"MRN{random.Random(i).randrange(10**9):09d}-{i}" for i in range(2000)]
    for s in (SplitSettings(validation=0.2, test=0.2, seed=0), SplitSettings(validation=0.1, test=0.3, seed=9)):
        counts = _counts(assign_splits(ids, s))
        assert abs(counts["test"] / 2000 - s.test) < 0.03
        assert abs(counts["validation"] / 2000 - s.validation) < 0.03
        assert sum(counts.values()) == 2000


def test_hashed_small_sites_are_repaired_and_always_train():
    s0 = SplitSettings(validation=0.2, test=0.2)
    for seed in range(400):
        s = SplitSettings(validation=s0.validation, test=s0.test, seed=seed)
        for n in range(1, 8):
            ids = [f"p{seed}-{i}" for i in range(n)]
            counts = _counts(assign_splits(ids, s))
            assert counts["training"] >= 1, (seed, n)
            if n >= MIN_CASES_FOR_HELD_OUT:  # every positive share gets a case
                assert counts["test"] >= 1 and counts["validation"] >= 1, (seed, n, counts)
            else:
                assert counts["training"] + counts["validation"] + counts["test"] == n


def test_hashed_split_is_stable_when_a_site_adds_cases_if_the_smaller_site_needed_no_repair():
    rng = random.Random(11)
    checked = 0
    for trial in range(400):
        s = SplitSettings(validation=rng.choice([0.2, 0.3]), test=rng.choice([0.0, 0.1, 0.2]), seed=rng.randrange(100))
        pool = [f"anon-{trial}-{i}" for i in range(60)]
        small = rng.sample(pool, rng.randint(1, 12))
        large = small + [c for c in rng.sample(pool, 30) if c not in small]
        raw = _raw_hashed(small, s)
        if not _needs_no_repair(raw, s):
            continue
        assert assign_splits(small, s) == raw
        after = assign_splits(large, s)
        assert {c: after[c] for c in small} == raw
        checked += 1
    assert checked > 100
