import math

import pytest

from actprune import PruneConfig


def test_defaults_and_normalised_block():
    c = PruneConfig(0.9)
    assert c.block_size == (32, 32) and c.block_shape == (32, 32) and c.criterion == "l2"
    assert PruneConfig(0.5, block_size=(8, 16)).block_shape == (8, 16)
    assert PruneConfig(0.5, block_size=[4, 2]).block_shape == (4, 2)


@pytest.mark.parametrize(
    "kwargs, field, shown",
    [
        ({"sparsity": 1.5}, "sparsity", "1.5"),
        ({"sparsity": -0.1}, "sparsity", "-0.1"),
        ({"sparsity": math.nan}, "sparsity", "nan"),
        ({"sparsity": "0.5"}, "sparsity", "'0.5'"),
        ({"sparsity": True}, "sparsity", "True"),
        ({"sparsity": 0.5, "block_size": 0}, "block_size", "0"),
        ({"sparsity": 0.5, "block_size": (8,)}, "block_size", "(8,)"),
        ({"sparsity": 0.5, "block_size": (8, 0)}, "block_size", "(8, 0)"),
        ({"sparsity": 0.5, "block_size": 2.5}, "block_size", "2.5"),
        ({"sparsity": 0.5, "criterion": "l3"}, "criterion", "'l3'"),
        ({"sparsity": 0.5, "row_order": "random"}, "row_order", "'random'"),
    ],
)
def test_invalid_values_name_field_value_and_allowed(kwargs, field, shown):
    with pytest.raises(ValueError) as err:
        PruneConfig(**kwargs)
    msg = str(err.value)
    assert f"PruneConfig.{field}" in msg and shown in msg
    allowed = {
        "sparsity": "[0, 1]",
        "block_size": "positive int",
        "criterion": "'l2'",
        "row_order": "'token-major'",
    }
    assert allowed[field] in msg


def test_sparsity_one_is_uniform_quantization_and_needs_a_remainder():
    with pytest.raises(ValueError, match=r"sparsity 1 keeps no block: it needs remainder_bits"):
        PruneConfig(1.0, 32)
    uniform = PruneConfig(1, 32, remainder_bits=8)
    assert uniform.uniform and uniform.kept_blocks(100) == 0 and uniform.kept_grid_blocks(5, 7) == 0
    assert not PruneConfig(0.999, 32).uniform


@pytest.mark.parametrize(
    "sparsity, n, k",
    [
        (0.0, 10, 10),
        (0.9, 100, 10),
        (0.7, 10, 3),
        (0.5, 7, 4),
        (0.95, 3, 1),
        (0.999999, 10, 1),
        # s·n just below a whole number in floating point (0.7·90 = 62.99999999999999): the guard
        # in kept_blocks keeps the true ceil((1 - s)·n), not one block more
        (0.7, 90, 27),
        (0.29, 100, 71),
        (0.57, 100, 43),
    ],  # fmt: skip
)
def test_kept_blocks_is_ceil_of_density(sparsity, n, k):
    assert PruneConfig(sparsity).kept_blocks(n) == k


def test_frozen():
    with pytest.raises(AttributeError):
        PruneConfig(0.5).sparsity = 0.1
