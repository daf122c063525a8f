import math

import pytest
import torch

from switchkd import SwitchPolicy, fused_switch_step, reference

from conftest import DEVICE, assert_error_ratio, random_logits
from test_kd_loss import GRAD_ATOL, LOSS_ATOL, plain_torch_loss

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(41, 1271), (3, 7), (1, 1), (3, 32000), (2, 50257), (1, 151936)]
POLICY = SwitchPolicy("exp", tau0=0.3, decay=0.05)
# A decision is only compared where the divergence is this far from the threshold (float32 vs float64).
DECISION_MARGIN = 1e-5


def both(s, t, positions, **kwargs):
    """(kernel step, float64 reference step)."""
    return fused_switch_step(s, t, positions, **kwargs), reference.switch_step(s.double(), t.double(), positions,
                                                                                 **kwargs)


def assert_same_decisions(out, ref, thresholds):
    clear = (ref.divergence.double() - thresholds).abs() > DECISION_MARGIN
    assert torch.equal(out.from_teacher[clear], ref.from_teacher[clear])
    assert torch.equal(out.tokens[clear], ref.tokens[clear])


@pytest.mark.parametrize("temperature", [1.0, 0.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows, vocab", SHAPES)
def test_matches_reference(rows, vocab, dtype, temperature):
    s, t = random_logits(rows, vocab, dtype), random_logits(rows, vocab, dtype)
    positions = torch.randint(0, 60, (rows,), device=DEVICE)
    out, ref = both(s, t, positions, policy=POLICY, temperature=temperature, seed=1234)
    assert out.tokens.dtype == torch.int64 and out.from_teacher.dtype == torch.bool
    assert out.divergence.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert torch.equal(out.student_tokens, ref.student_tokens)
    assert torch.equal(out.teacher_tokens, ref.teacher_tokens)
    assert_same_decisions(out, ref, POLICY.thresholds(positions))
    div_t = temperature or 1.0
    plain = plain_torch_loss(s, t, "jsd", div_t)
    assert_error_ratio("divergence", out.divergence, ref.divergence, plain, LOSS_ATOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind, params", [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.3}), ("skl", {"alpha": 0.1}),
                                          ("srkl", {"alpha": 0.1}), ("tvd", {})], ids=str)
@pytest.mark.parametrize("rows, vocab", [(41, 1271), (3, 32000)])
def test_loss_and_gradient(rows, vocab, kind, params, dtype):
    s, t = random_logits(rows, vocab, dtype), random_logits(rows, vocab, dtype)
    upstream = torch.rand(rows, device=DEVICE, dtype=torch.float64) + 0.5
    results = []
    for x, step in [(s, lambda x: fused_switch_step(x, t, 3, loss=kind, temperature=0.9, **params).loss),
                    (s.double(), lambda x: reference.switch_step(x, t.double(), 3, loss=kind, temperature=0.9,
                                                                 **params).loss),
                    (s, lambda x: plain_torch_loss(x, t, kind, 0.9, **params))]:
        x = x.detach().clone().requires_grad_()
        loss = step(x)
        (grad,) = torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), x)
        results.append((loss.detach(), grad))
    (out, grad), (ref, ref_grad), (plain, plain_grad) = results
    assert grad.dtype == dtype
    assert_error_ratio("loss", out, ref, plain, LOSS_ATOL[dtype])
    assert_error_ratio("grad", grad, ref_grad, plain_grad, GRAD_ATOL[dtype])


@pytest.mark.parametrize("kind", ["exp", "linear", "constant", "never", "always"])
def test_threshold_policies_decide_at_their_thresholds(kind):
    policy = SwitchPolicy(kind, tau0=0.2, decay=0.01)
    s = random_logits(64, 301)
    t = s + random_logits(64, 301, spread=(0.0, 1.5))  # divergences from ~0 to large
    positions = torch.arange(64, device=DEVICE) % 16
    out = fused_switch_step(s, t, positions, policy=policy)
    thresholds = policy.thresholds(positions)
    expected = out.divergence.double() > thresholds
    clear = (out.divergence.double() - thresholds).abs() > DECISION_MARGIN
    assert torch.equal(out.from_teacher[clear], expected[clear])
    assert torch.equal(out.tokens, torch.where(out.from_teacher, out.teacher_tokens, out.student_tokens))
    if kind in ("exp", "linear"):
        assert 0 < out.from_teacher.sum() < 64, "the test data should exercise both decisions"


@pytest.mark.parametrize("top_k", [1, 5, 40])
def test_topk_keeps_student_tokens_in_the_teacher_top_k(top_k):
    s, t = random_logits(41, 97), random_logits(41, 97)
    out = fused_switch_step(s, t, 0, policy=SwitchPolicy("topk", top_k=top_k))
    rank = (t > t.gather(1, out.student_tokens[:, None])).sum(1)
    assert torch.equal(out.from_teacher, rank >= top_k)
    ref = reference.switch_step(s.double(), t.double(), 0, policy=SwitchPolicy("topk", top_k=top_k))
    assert torch.equal(out.tokens, ref.tokens)


def test_sampling_is_a_pure_function_of_seed_key_and_position():
    s, t = random_logits(16, 500), random_logits(16, 500)
    a = fused_switch_step(s, t, 5, seed=7)
    assert torch.equal(a.tokens, fused_switch_step(s, t, 5, seed=7).tokens)
    assert not torch.equal(a.student_tokens, fused_switch_step(s, t, 5, seed=8).student_tokens)
    assert not torch.equal(a.student_tokens, fused_switch_step(s, t, 6, seed=7).student_tokens)
    # Rows carry their noise with their key: permuting rows and keys together permutes the tokens.
    perm = torch.randperm(16, device=DEVICE)
    b = fused_switch_step(s[perm], t[perm], 5, seed=7, row_keys=perm)
    assert torch.equal(b.student_tokens, a.student_tokens[perm])
    assert torch.equal(b.teacher_tokens, a.teacher_tokens[perm])


def test_greedy_is_argmax():
    s, t = random_logits(41, 1271), random_logits(41, 1271)
    out = fused_switch_step(s, t, 0, temperature=0.0)
    assert torch.equal(out.student_tokens, s.argmax(-1))
    assert torch.equal(out.teacher_tokens, t.argmax(-1))


def chi2_sf_even_dof(x, dof):
    """Survival function of the chi-square distribution for an even number of degrees of freedom."""
    half = x / 2
    return math.exp(-half) * sum(half**k / math.factorial(k) for k in range(dof // 2))


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_frequencies_match_the_softmax(temperature):
    """Chi-square goodness of fit of 20000 reference draws (V = 7, 6 degrees of freedom); the kernel
    is then shown to draw the very same tokens on a subset.

    The test fails when the p-value is below 1e-6: a correct sampler fails it once in a million seeds.
    """
    draws, vocab = 20000, 7
    row = torch.tensor([1.5, 0.2, -0.3, 0.9, -1.2, 0.0, 0.5], device=DEVICE)
    s = row.expand(draws, vocab).contiguous()
    t = s.flip(-1).contiguous()
    ref = reference.switch_step(s, t, 0, temperature=temperature, seed=11)
    for tokens, logits in [(ref.student_tokens, row), (ref.teacher_tokens, row.flip(-1))]:
        counts = torch.bincount(tokens, minlength=vocab).double()
        expected = torch.softmax(logits.double() / temperature, -1) * draws
        stat = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2_sf_even_dof(stat, vocab - 1) > 1e-6, f"chi2 = {stat:.1f}"
    out = fused_switch_step(s[:200], t[:200], 0, temperature=temperature, seed=11)
    assert torch.equal(out.student_tokens, ref.student_tokens[:200])
    assert torch.equal(out.teacher_tokens, ref.teacher_tokens[:200])


def test_noise_hash_matches_between_python_ints_and_tensors():
    keys = torch.tensor([0, 1, 2**31, 2**32 - 1, 12345])
    assert reference.mix32(keys).tolist() == [reference.mix32(k) for k in keys.tolist()]
    u = reference.uniform_noise(3, keys, torch.zeros_like(keys), 0, 4096)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.01


def test_gradient_flows_only_when_asked():
    s = random_logits(4, 100).requires_grad_()
    out = fused_switch_step(s, random_logits(4, 100), 0)
    assert out.loss.requires_grad and not out.divergence.requires_grad
    with torch.no_grad():
        assert not fused_switch_step(s, random_logits(4, 100), 0).loss.requires_grad


def test_non_finite_logits_raise_naming_the_argument():
    s, t = random_logits(4, 100), random_logits(4, 100)
    t[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"teacher_logits .* row\(s\) \[2\]"):
        fused_switch_step(s, t, 0)
    s[1] = float("-inf")
    with pytest.raises(ValueError, match="student_logits"):
        fused_switch_step(s, random_logits(4, 100), 0)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda s, t: fused_switch_step(s, t[:, :-1], 0), ValueError, "vocabulary mismatch"),
        (lambda s, t: fused_switch_step(s[None], t[None], 0), ValueError, r"\[B, V\]"),
        (lambda s, t: fused_switch_step(s.int(), t, 0), TypeError, "student_logits"),
        (lambda s, t: fused_switch_step(s, t, -1), ValueError, "positions"),
        (lambda s, t: fused_switch_step(s, t, 1.5), TypeError, "positions"),
        (lambda s, t: fused_switch_step(s, t, torch.zeros(3, dtype=torch.long)), ValueError, "positions"),
        (lambda s, t: fused_switch_step(s, t, torch.zeros(4)), TypeError, "positions"),
        (lambda s, t: fused_switch_step(s, t, 0, row_keys=torch.zeros(2, dtype=torch.long)), ValueError, "row_keys"),
        (lambda s, t: fused_switch_step(s, t, 0, policy="exp"), TypeError, "policy"),
        (lambda s, t: fused_switch_step(s, t, 0, temperature=-1.0), ValueError, "temperature"),
        (lambda s, t: fused_switch_step(s, t, 0, seed=1.0), TypeError, "seed"),
        (lambda s, t: fused_switch_step(s, t, 0, loss="ce"), ValueError, "loss kind"),
        (lambda s, t: fused_switch_step(s, t, 0, alpha=2.0), ValueError, "alpha"),
    ],
)
def test_bad_input_raises(call, error, match):
    s, t = random_logits(4, 10, device="cpu"), random_logits(4, 10, device="cpu")
    with pytest.raises(error, match=match):
        call(s, t)
