"""Cross-entropy of a linear head without the logits: the language model's largest saved tensor.

A language model's loss is ``F.cross_entropy(hidden @ Wᵀ + b, target)``: autograd keeps the
[N, V] logits (or their log-softmax) for backward, V the vocabulary: 50257 for GPT-2, so at 8 ×
1024 tokens 1.6 GB in float32, more than the rest of a small model's activations. The gradient
needs only softmax(logits) − onehot(target), which the logits' log-sum-exp (one float per row)
and the hidden states and weight give again: ``linear_cross_entropy`` computes the loss a chunk
of rows at a time, keeps the log-sum-exp, and recomputes each chunk's logits in backward (one
more matmul of the head), so no [N, V] tensor outlives its chunk (the idea of Liger-Kernel's
FusedLinearCrossEntropy and of Cut Cross-Entropy, arXiv 2411.09009). Exact: the same loss and
gradients as the two-step form, to float rounding (the sums are chunked).
"""

from __future__ import annotations

import torch

# Logits computed at a time (elements): 16 MB of float32, far below an LM head's [N, V].
CHUNK_ELEMENTS = 1 << 22


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    ignore_index: int = -100,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of the logits ``hidden @ weight.T + bias`` against ``target`` over the
    rows whose target is not ``ignore_index``, never holding all the logits.

    Args:
        hidden: [..., d] features (the head's input).
        weight: [V, d] the head's weight; bias: [V] or None.
        target: [...] class indices (int64), ``ignore_index`` where no loss is taken.

    Keyword args:
        ignore_index: as ``F.cross_entropy``'s.
        chunk_rows: rows whose logits are computed at once (default: ``CHUNK_ELEMENTS // V``).

    Returns:
        The scalar loss, equal to ``F.cross_entropy(F.linear(hidden, weight, bias).flatten(0, -2),
        target.flatten(), ignore_index=ignore_index)`` to float rounding (NaN when every target is
        ignored, as there).

    Example:
        >>> import torch, torch.nn.functional as F
        >>> from actprune import linear_cross_entropy
        >>> h, w, y = torch.randn(6, 8), torch.randn(50, 8), torch.randint(0, 50, (6,))
        >>> torch.allclose(linear_cross_entropy(h, w, y), F.cross_entropy(h @ w.T, y))
        True
    """
    if hidden.shape[:-1] != target.shape:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} and target "
                         f"{tuple(target.shape)} must agree but for the feature dim")  # fmt: skip
    rows = chunk_rows or max(1, CHUNK_ELEMENTS // max(1, weight.shape[0]))
    h2, t1 = hidden.reshape(-1, hidden.shape[-1]), target.reshape(-1)
    return _LinearCrossEntropy.apply(h2, weight, bias, t1, ignore_index, rows)


def _chunks(n: int, rows: int, device: torch.device) -> range:
    """Row ranges' starts. On "meta" (the planner) one chunk stands for all: each allocates the
    same, and a loop over millions of rows would only cost time."""
    return range(0, min(n, rows) if device.type == "meta" else n, rows)


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """float32 logits of a chunk (in the input's dtype first, as F.linear would compute them)."""
    return torch.nn.functional.linear(h, weight, bias).float()


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, target, ignore_index, rows):
        valid = target != ignore_index
        lse = torch.empty(h.shape[0], dtype=torch.float32, device=h.device)
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        for start in _chunks(h.shape[0], rows, h.device):
            end = min(h.shape[0], start + rows)
            logits = _logits(h[start:end], weight, bias)
            lse[start:end] = torch.logsumexp(logits, dim=1)
            t = target[start:end].clamp_min(0).unsqueeze(1)
            picked = logits.gather(1, t).squeeze(1)
            total += torch.where(valid[start:end], lse[start:end] - picked, 0.0).sum()
        count = valid.sum()
        ctx.save_for_backward(h, weight, bias, target, lse, count)
        ctx.rows, ctx.ignore_index = rows, ignore_index
        loss = total / count
        # No .to() of the same dtype: an output that aliases an intermediate got a zero gradient
        # from torch 2.11's dynamo (every parameter's gradient was 0 under torch.compile).
        return loss if loss.dtype == h.dtype else loss.to(h.dtype)

    @staticmethod
    def backward(ctx, grad):
        h, weight, bias, target, lse, count = ctx.saved_tensors
        valid = target != ctx.ignore_index
        scale = grad.float() / count
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(h) if need_h else None
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
        db = torch.zeros(weight.shape[0], dtype=torch.float32, device=h.device) if need_b else None
        for start in _chunks(h.shape[0], ctx.rows, h.device):
            end = min(h.shape[0], start + ctx.rows)
            # d loss / d logits = (softmax - onehot) · scale on the rows that count, else 0.
            p = (_logits(h[start:end], weight, bias) - lse[start:end, None]).exp_()
            p.scatter_add_(1, target[start:end].clamp_min(0).unsqueeze(1),
                           torch.full((end - start, 1), -1.0, device=h.device))  # fmt: skip
            p.mul_(torch.where(valid[start:end], scale, 0.0)[:, None])
            g = p.to(h.dtype)
            if need_h:
                dh[start:end] = g @ weight
            if need_w:
                dw += (g.t() @ h[start:end]).float()
            if need_b:
                db += p.sum(0)
        dw = None if dw is None else dw.to(weight.dtype)
        db = None if db is None else db.to(bias.dtype)
        return dh, dw, db, None, None, None
