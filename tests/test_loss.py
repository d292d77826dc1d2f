"""``linear_cross_entropy``: F.cross_entropy of a linear head in value and every gradient, without
the logits among the saved tensors."""

import pytest
import torch
import torch.nn.functional as F

from actprune import linear_cross_entropy, saved_activation_bytes


def _reference(h, w, b, y):
    return F.cross_entropy(F.linear(h, w, b).flatten(0, -2), y.flatten())


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("chunk_rows", [None, 1, 7])
def test_equals_cross_entropy_in_value_and_gradients(bias, chunk_rows):
    torch.manual_seed(0)
    h = torch.randn(3, 11, 16, requires_grad=True)
    w = torch.randn(37, 16, requires_grad=True)
    b = torch.randn(37, requires_grad=True) if bias else None
    y = torch.randint(0, 37, (3, 11))
    y[0, :4] = -100  # ignored positions take no loss and give no gradient
    got = linear_cross_entropy(h, w, y, b, chunk_rows=chunk_rows)
    grads = torch.autograd.grad(got, [t for t in (h, w, b) if t is not None])
    want = _reference(h, w, b, y)
    want_grads = torch.autograd.grad(want, [t for t in (h, w, b) if t is not None])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for a, e in zip(grads, want_grads):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    assert (grads[0][0, :4] == 0).all()


@pytest.mark.parametrize("chunk_rows", [None, 7])
def test_compiled_gradients_equal_eager(chunk_rows):
    """torch.compile traces the Function (dynamo alone: the property is its graph, not inductor's
    code); torch 2.11's dynamo once gave every gradient as 0 (an output aliasing an
    intermediate)."""
    torch.manual_seed(0)
    h, w = torch.randn(5, 16, requires_grad=True), torch.randn(37, 16, requires_grad=True)
    y = torch.randint(0, 37, (5,))
    loss = torch.compile(linear_cross_entropy, backend="eager", fullgraph=True)
    got = torch.autograd.grad(loss(h, w, y, chunk_rows=chunk_rows), [h, w])
    want = torch.autograd.grad(_reference(h, w, None, y), [h, w])
    for a, e in zip(got, want):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_every_target_ignored_is_nan_as_cross_entropy():
    h, w = torch.randn(4, 8), torch.randn(5, 8)
    y = torch.full((4,), -100)
    assert linear_cross_entropy(h, w, y).isnan() and _reference(h, w, None, y).isnan()


def test_the_logits_are_never_saved():
    torch.manual_seed(0)
    h = torch.randn(64, 32, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(1000, 32))  # parameters are not counted
    y = torch.randint(0, 1000, (64,))
    saved = saved_activation_bytes(lambda: linear_cross_entropy(h, w, y, chunk_rows=16))
    logits = 64 * 1000 * 4
    assert saved < 64 * 32 * 4 + 64 * 8 + 64 * 4 + 64  # h, target, log-sum-exp, count
    assert saved_activation_bytes(lambda: _reference(h, w, None, y)) >= logits


def test_shapes_must_agree():
    with pytest.raises(ValueError, match="must agree"):
        linear_cross_entropy(torch.randn(4, 8), torch.randn(5, 8), torch.zeros(3, dtype=torch.long))
