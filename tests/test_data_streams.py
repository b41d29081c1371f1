"""The random streams of the data pipeline: one registry, one helper, no two purposes on one stream."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

import mgpt4
from mgpt4.data.streams import KEYS, Stream, stream_rng, stream_seed


def test_every_purpose_draws_a_distinct_stream():
    # The same key values for every purpose: only the purpose tells the streams apart.
    draws = {}
    for purpose in Stream:
        key = {name: 7 for name in KEYS[purpose]}
        draws[purpose] = tuple(stream_rng(purpose, **key).integers(2**63, size=4).tolist())
    assert len(set(draws.values())) == len(Stream), draws
    # Every purpose has its own tag and its key fields named once.
    assert len({int(p) for p in Stream}) == len(Stream)
    assert set(KEYS) == set(Stream)
    assert all(len(set(names)) == len(names) for names in KEYS.values())


def test_a_stream_is_fixed_by_its_key_and_moves_with_each_field():
    for purpose in Stream:
        base = {name: 3 for name in KEYS[purpose]}
        first = stream_rng(purpose, **base).random(4)
        np.testing.assert_array_equal(stream_rng(purpose, **base).random(4), first)
        for name in KEYS[purpose]:
            moved = stream_rng(purpose, **{**base, name: 4}).random(4)
            assert not np.array_equal(moved, first), (purpose, name)


def test_stream_seed_and_rng_agree():
    state = stream_seed(Stream.DATA_PASS, seed=1, data_pass=2).generate_state(2)
    again = stream_seed(Stream.DATA_PASS, data_pass=2, seed=1).generate_state(2)
    np.testing.assert_array_equal(state, again)  # the registry fixes the order, not the call
    assert (
        stream_rng(Stream.DATA_PASS, seed=1, data_pass=2).random()
        == np.random.default_rng(stream_seed(Stream.DATA_PASS, seed=1, data_pass=2)).random()
    )


def test_a_wrong_key_names_the_stream_and_its_fields():
    with pytest.raises(
        TypeError, match=r"SHARD_MIX is keyed by \['seed', 'reader', 'batch'\], got \['batch', 'seed'\]"
    ):
        stream_rng(Stream.SHARD_MIX, seed=0, batch=1)
    with pytest.raises(TypeError, match="ALIGN_HOLDOUT is keyed by"):
        stream_rng(Stream.ALIGN_HOLDOUT, seed=0)


def test_no_data_module_seeds_a_generator_of_its_own():
    # Every run stream goes through the registry; synthetic.py writes test data sets, not a run's draws.
    root = pathlib.Path(mgpt4.__file__).parent / "data"
    own = re.compile(r"default_rng\(|SeedSequence\(|np\.random\.(seed|rand|randint|choice|permutation)\(")
    found = [
        f"{path.name}:{n}"
        for path in sorted(root.glob("*.py"))
        if path.name not in ("streams.py", "synthetic.py")
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if own.search(line)
    ]
    assert found == []
