import math

import pytest
import torch

from switchkd import kd_loss, reference

from conftest import DEVICE, assert_error_ratio, random_logits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Absolute slack on top of the error-ratio bound: loss values (nats), gradients.
LOSS_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
GRAD_ATOL = {torch.float32: 1e-7, torch.bfloat16: 1e-6, torch.float16: 1e-6}
KINDS = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.3}), ("skl", {"alpha": 0.1}),
         ("srkl", {"alpha": 0.2}), ("tvd", {})]
SHAPES = [(41, 1271), (3, 7), (1, 1), (3, 32000), (2, 50257)]


def plain_torch_loss(s, t, kind, temperature, **params):
    """What a user would write in PyTorch at the input dtype: the error baseline."""
    log_ps = torch.log_softmax(s / temperature, -1)
    log_pt = torch.log_softmax(t / temperature, -1)
    return reference.row_divergence(log_ps, log_pt, kind, **params)


def run_rows(s, t, kind, params, temperature=1.0):
    """Per-row loss and its gradient under a random upstream gradient: (kernel, float64 ref, plain torch)."""
    upstream = torch.rand(s.shape[0], dtype=torch.float64, device=s.device) + 0.5
    results = []
    for fn, x, y in [
        (lambda a, b: kd_loss(a, b, kind=kind, temperature=temperature, reduction="none", **params), s, t),
        (lambda a, b: reference.kd_loss(a, b, kind=kind, temperature=temperature, reduction="none", **params),
         s.double(), t.double()),
        (lambda a, b: plain_torch_loss(a, b, kind, temperature, **params), s, t),
    ]:
        x = x.detach().clone().requires_grad_()
        rows = fn(x, y)
        (grad,) = torch.autograd.grad((rows * upstream.to(rows.dtype)).sum(), x)
        results.append((rows.detach(), grad))
    return results


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind, params", KINDS, ids=lambda k: str(k))
@pytest.mark.parametrize("rows, vocab", SHAPES)
def test_matches_reference(rows, vocab, kind, params, dtype):
    s = random_logits(rows, vocab, dtype)
    t = random_logits(rows, vocab, dtype)
    (out, grad), (ref, ref_grad), (plain, plain_grad) = run_rows(s, t, kind, params, temperature=1.3)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    assert_error_ratio("loss", out, ref, plain, LOSS_ATOL[dtype])
    assert_error_ratio("grad", grad, ref_grad, plain_grad, GRAD_ATOL[dtype])


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_and_ignore_index(reduction):
    s = random_logits(2 * 19, 523).view(2, 19, 523)
    t = random_logits(2 * 19, 523).view(2, 19, 523)
    labels = torch.randint(0, 523, (2, 19), device=DEVICE)
    labels[0, :7] = -100
    labels[1, 11:] = -100
    xs = [s.clone().requires_grad_(), s.double().requires_grad_()]
    out = kd_loss(xs[0], t, labels, kind="srkl", reduction=reduction)
    ref = reference.kd_loss(xs[1], t.double(), labels, kind="srkl", reduction=reduction)
    upstream = torch.rand(()) + 0.5
    (grad,) = torch.autograd.grad(out * upstream, xs[0])
    (ref_grad,) = torch.autograd.grad(ref * upstream, xs[1])
    assert out.shape == () and out.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    assert (grad[labels == -100] == 0).all() and (grad[labels != -100] != 0).any()


def test_all_ignored_mean_is_zero_with_zero_grad():
    s = random_logits(5, 64).requires_grad_()
    loss = kd_loss(s, random_logits(5, 64), torch.full((5,), -100, device=DEVICE), reduction="mean")
    loss.backward()
    assert loss.item() == 0.0 and (s.grad == 0).all()


def test_leading_dims_and_none_shape():
    s, t = random_logits(12, 33).view(3, 4, 33), random_logits(12, 33).view(3, 4, 33)
    out = kd_loss(s, t, kind="fkl", reduction="none")
    assert out.shape == (3, 4)
    ref = reference.kd_loss(s.double(), t.double(), kind="fkl", reduction="none")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta, twin", [(0.0, "fkl"), (1.0, "rkl")])
def test_jsd_ends_are_fkl_and_rkl(beta, twin):
    s, t = random_logits(9, 300), random_logits(9, 300)
    torch.testing.assert_close(kd_loss(s, t, kind="jsd", beta=beta), kd_loss(s, t, kind=twin))


def test_symmetric_jsd_is_symmetric_and_bounded():
    s, t = random_logits(17, 1271, spread=(0.5, 30.0)), random_logits(17, 1271, spread=(0.5, 30.0))
    a = kd_loss(s, t, kind="jsd", beta=0.5, reduction="none")
    b = kd_loss(t, s, kind="jsd", beta=0.5, reduction="none")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (a >= -1e-6).all() and (a <= math.log(2) + 1e-6).all()


def test_masked_vocabulary_entries_stay_finite():
    s, t = random_logits(4, 200), random_logits(4, 200)
    s[:, 150:] = float("-inf")
    t[:, 150:] = float("-inf")
    for kind in reference.LOSS_KINDS:
        x = s.clone().requires_grad_()
        loss = kd_loss(x, t, kind=kind)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), kind
        assert (x.grad[:, 150:] == 0).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_give_a_nan_loss(bad):
    s, t = random_logits(4, 100), random_logits(4, 100)
    t[1, 3] = bad
    rows = kd_loss(s, t, kind="srkl", reduction="none")
    assert rows[1].isnan() and torch.isfinite(rows[[0, 2, 3]]).all()


def test_second_backward_through_the_same_graph_raises():
    s = random_logits(3, 50).requires_grad_()
    loss = kd_loss(s, random_logits(3, 50))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s, t: kd_loss(s, t[:, :-1]), ValueError, "vocabulary mismatch"),
        (lambda s, t: kd_loss(s, t[:2]), ValueError, "teacher_logits shape"),
        (lambda s, t: kd_loss(s.long(), t), TypeError, "student_logits"),
        (lambda s, t: kd_loss(s.numpy(), t), TypeError, "student_logits"),
        (lambda s, t: kd_loss(s, t, kind="kl"), ValueError, "kind"),
        (lambda s, t: kd_loss(s, t, alpha=1.5), ValueError, "alpha"),
        (lambda s, t: kd_loss(s, t, beta=-0.1), ValueError, "beta"),
        (lambda s, t: kd_loss(s, t, temperature=0.0), ValueError, "temperature"),
        (lambda s, t: kd_loss(s, t, reduction="avg"), ValueError, "reduction"),
        (lambda s, t: kd_loss(s, t, torch.zeros(4)), TypeError, "labels"),
        (lambda s, t: kd_loss(s, t, torch.zeros(3, dtype=torch.long)), ValueError, "labels"),
        (lambda s, t: kd_loss(s, t, backend="cuda"), ValueError, "backend"),
        (lambda s, t: kd_loss(s[:, :0], t[:, :0]), ValueError, "vocabulary"),
    ],
)
def test_bad_input_raises(call, error, match):
    s, t = random_logits(4, 10, device="cpu"), random_logits(4, 10, device="cpu")
    with pytest.raises(error, match=match):
        call(s, t)
