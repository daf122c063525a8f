import pytest
import torch

from switchkd import fused_linear_kd_loss, kd_loss

from conftest import DEVICE

KINDS = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.3}), ("skl", {"alpha": 0.1}), ("srkl", {"alpha": 0.2}),
         ("tvd", {})]


def inputs(rows=37, vocab=211, h_s=24, h_t=40, dtype=torch.float32):
    hs = torch.randn(rows, h_s, dtype=dtype, device=DEVICE)
    ws = torch.randn(vocab, h_s, dtype=dtype, device=DEVICE) / h_s**0.5 * 3
    ht = torch.randn(rows, h_t, dtype=dtype, device=DEVICE)
    wt = torch.randn(vocab, h_t, dtype=dtype, device=DEVICE) / h_t**0.5 * 3
    labels = torch.randint(0, vocab, (rows,), device=DEVICE)
    labels[::4] = -100
    return hs, ws, ht, wt, labels


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind, params", KINDS, ids=str)
def test_matches_kd_loss_on_full_logits(kind, params, reduction):
    hs, ws, ht, wt, labels = inputs()
    upstream = torch.rand(()) + 0.5
    results = []
    for fused in (True, False):
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        if fused:
            loss = fused_linear_kd_loss(h, w, ht, wt, labels, kind=kind, temperature=1.4, reduction=reduction,
                                        chunk_rows=8, **params)
        else:
            loss = kd_loss(h @ w.T, ht @ wt.T, labels, kind=kind, temperature=1.4, reduction=reduction, **params)
        (loss * upstream).backward()
        results.append((loss.detach(), h.grad, w.grad))
    for got, want in zip(results[0], results[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_leading_dims_and_errors():
    hs, ws, ht, wt, labels = inputs(rows=12)
    loss = fused_linear_kd_loss(hs.view(3, 4, -1), ws, ht.view(3, 4, -1), wt, labels.view(3, 4))
    torch.testing.assert_close(loss, fused_linear_kd_loss(hs, ws, ht, wt, labels))
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        fused_linear_kd_loss(hs, ws, ht, wt[:-1], labels)
    with pytest.raises(ValueError, match="hidden sizes"):
        fused_linear_kd_loss(hs, ws[:, :-1], ht, wt, labels)
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_kd_loss(hs, ws, ht, wt, labels, reduction="none")
    with pytest.raises(ValueError, match="chunk_rows"):
        fused_linear_kd_loss(hs, ws, ht, wt, labels, chunk_rows=0)
