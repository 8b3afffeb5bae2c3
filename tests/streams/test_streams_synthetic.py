"""The synthetic stream: deterministic per event index, fast payloads equal to the
reference JSON, bad payloads where asked, and a config that matches it."""

from __future__ import annotations

import numpy as np
import orjson

from engine.config import config_from_dict
from streams.synthetic import (
    BAD_PAYLOADS,
    SyntheticSpec,
    generate_arrays,
    generate_events,
    generate_payloads,
    synthetic_config_dict,
)

SPEC = SyntheticSpec(num_dense=3, num_sparse=4, cardinality=300, seed=11)


def test_payloads_are_the_reference_json_byte_for_byte():
    for spec in (SPEC, SyntheticSpec(num_dense=0, num_sparse=1, cardinality=2), SyntheticSpec(num_dense=2, num_sparse=0)):
        assert generate_payloads(spec, 5000, 77) == [orjson.dumps(e) for e in generate_events(spec, 5000, 77)]


def test_any_chunking_gives_the_same_events():
    whole = generate_arrays(SPEC, 10_000)
    part = generate_arrays(SPEC, 1234, 4000)
    np.testing.assert_array_equal(part.ids, whole.ids[4000:5234])
    np.testing.assert_array_equal(part.labels, whole.labels[4000:5234])
    assert generate_payloads(SPEC, 100, 4050) == generate_payloads(SPEC, 5000)[4050:4150]


def test_bad_fraction_injects_every_kind_of_bad_payload():
    payloads = generate_payloads(SPEC, 1000, bad_fraction=0.01)
    bad = [p for p in payloads if p in BAD_PAYLOADS]
    assert len(bad) == 10 and set(bad) == set(BAD_PAYLOADS)


def test_planted_signal_is_learnable_from_groups():
    a = generate_arrays(SyntheticSpec(seed=3), 50_000)
    # the click rate differs between the groups of an informative feature
    rates = [a.labels[a.groups[:, 0] == g].mean() for g in np.unique(a.groups[:, 0])]
    assert np.ptp(rates) > 0.2


def test_config_matches_the_events():
    cfg = config_from_dict(synthetic_config_dict(SPEC))
    ev = next(generate_events(SPEC, 1))
    assert set(cfg.schema.feature_names) | {"label", "ts"} >= set(ev)
    assert cfg.schema.event_time == "ts"
