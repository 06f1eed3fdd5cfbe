"""Pairs of models to diff: `ModelSpec` (what to load) and `Pair` (how to compare)."""
from mechdiff.pairs.spec import (
    PLANTED_NAMES,
    TESTBED_NAMES,
    TOKENIZER_POLICIES,
    DatasetRef,
    ModelSpec,
    Pair,
    list_pairs,
    load_pair,
    pair_from_specs,
    testbed_names,
)

__all__ = [
    "PLANTED_NAMES", "TESTBED_NAMES", "TOKENIZER_POLICIES", "DatasetRef", "ModelSpec", "Pair",
    "list_pairs", "load_pair", "pair_from_specs", "testbed_names",
]
