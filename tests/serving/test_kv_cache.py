"""kv_cache.py: reserved buffers behave like transformers' DynamicLayer; rows join left-padded, and leave."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from raylm.serving.kv_cache import ReservedLayer, reserve, stack_rows, unpack_rows


def filled_cache(rows: int, length: int, seed: int) -> DynamicCache:
    gen = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for layer in range(2):
        cache.update(*(torch.randn(rows, 2, length, 4, generator=gen) for _ in range(2)), layer)
    return cache


def test_appends_match_dynamic_layer_also_past_the_reserved_room():
    plain, reserved = filled_cache(3, 5, seed=0), filled_cache(3, 5, seed=0)
    reserve(reserved, room=2)
    assert all(isinstance(layer, ReservedLayer) for layer in reserved.layers)
    for step in range(6):  # 2 fit in the room, then the buffer has to grow
        new = torch.full((3, 2, 1, 4), float(step))
        for layer in range(2):
            expected = plain.update(new, new, layer)
            got = reserved.update(new, new, layer)
            assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert reserved.get_seq_length() == plain.get_seq_length() == 11


def test_rows_leave():
    cache = filled_cache(3, 4, seed=1)
    before = cache.layers[0].keys.clone()
    reserve(cache, room=4)
    cache.batch_select_indices(torch.tensor([0, 2]))
    assert torch.equal(cache.layers[0].keys, before[[0, 2]])


def test_rows_join_left_padded_with_zeros():
    long, short = filled_cache(2, 6, seed=2), filled_cache(1, 3, seed=3)
    long_keys, short_keys = long.layers[1].keys.clone(), short.layers[1].keys.clone()
    reserve(long, room=1)
    stack_rows(long, short, width=6, room=5)
    keys = long.layers[1].keys
    assert keys.shape == (3, 2, 6, 4)
    assert torch.equal(keys[:2], long_keys)
    assert torch.equal(keys[2:, :, 3:], short_keys)
    assert not keys[2:, :, :3].any()  # padding is zeros, never uninitialized memory
    assert long.layers[1]._keys.shape[2] == 11  # and the joined rows have room for 5 more tokens


def test_views_cannot_be_replaced_behind_the_buffer():
    cache = filled_cache(1, 2, seed=4)
    reserve(cache, room=1)
    with pytest.raises(AttributeError):
        cache.layers[0].keys = torch.zeros(1)


def test_only_plain_layers_are_swapped():
    class OwnLayer(DynamicLayer):
        pass

    cache = filled_cache(1, 2, seed=5)
    cache.layers[1].__class__ = OwnLayer
    reserve(cache, room=3)
    assert type(cache.layers[0]) is ReservedLayer and type(cache.layers[1]) is OwnLayer


def test_packed_rows_are_split_left_padded():
    packed = filled_cache(1, 9, seed=6)  # prompts of 4, 2 and 3 tokens back to back
    keys = packed.layers[0].keys.clone()
    unpack_rows(packed, [4, 2, 3], room=2)
    rows = packed.layers[0].keys
    assert rows.shape == (3, 2, 4, 4) and packed.layers[0]._keys.shape[2] == 6
    assert torch.equal(rows[0], keys[0, :, 0:4])
    assert torch.equal(rows[1, :, 2:], keys[0, :, 4:6]) and not rows[1, :, :2].any()
    assert torch.equal(rows[2, :, 1:], keys[0, :, 6:9]) and not rows[2, :, :1].any()
