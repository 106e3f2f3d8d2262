"""T5's relative-position buckets equal transformers' own for every distance, both directions, across the exact,
logarithmic and clamped ranges."""

from __future__ import annotations

import pytest
import torch
from transformers.models.t5.modeling_t5 import T5Attention

from engine.layers.relative_bias import relative_buckets


@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 20)])
def test_buckets_match_transformers(bidirectional: bool, num_buckets: int, max_distance: int) -> None:
    rel = torch.arange(-300, 301)[None, :] - torch.arange(0, 3)[:, None]
    ours = relative_buckets(rel, bidirectional, num_buckets, max_distance)
    theirs = T5Attention._relative_position_bucket(rel, bidirectional, num_buckets, max_distance)
    assert torch.equal(ours, theirs)
    assert int(ours.min()) >= 0 and int(ours.max()) == num_buckets - 1
