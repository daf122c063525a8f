import math

import pytest
import torch

from switchkd import SwitchPolicy, fused_switch_step, reference
from switchkd.ops.spec import kernel_rows
from switchkd.ops.stored_grad import attach_grad
from switchkd.ops.switch_step import raise_on_bad_rows, switch_step_triton

from conftest import DEVICE, assert_error_ratio, assert_same_values, random_logits
from test_kd_loss import GPU_TILES, GRAD_ATOL, LOSS_ATOL, only_config, plain_torch_loss, strided_copy

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (rows, vocab, dtypes, temperatures): one split per row (V = 1, 7; B = 256), several (the rest).
CASES = [
    (3, 7, DTYPES, [1.0, 0.0, 0.7]),
    (1, 1, [torch.float32], [1.0, 0.0]),
    (3, 1271, [torch.float32, torch.bfloat16], [1.0, 0.0]),
    (256, 7, [torch.bfloat16], [0.7]),
    (1, 50257, [torch.float16], [0.7]),
    (1, 151936, [torch.bfloat16], [1.0]),
]
KINDS = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.3}), ("skl", {"alpha": 0.1}), ("srkl", {"alpha": 0.1}),
         ("tvd", {})]
POLICY = SwitchPolicy("exp", tau0=0.3, decay=0.05)
# A decision is only compared where the divergence is this far from the threshold (float32 vs float64).
DECISION_MARGIN = 1e-5


@pytest.fixture(params=["three launches", "one launch"])
def launches(request, monkeypatch):
    """The switch step as three launches (the default) and as one (``SWITCHKD_FUSED_STEP=1``), which the
    interpreter runs as its two halves."""
    monkeypatch.setenv("SWITCHKD_FUSED_STEP", "1" if request.param == "one launch" else "0")


def assert_same_decisions(out, ref, thresholds):
    clear = (ref.divergence.double() - thresholds).abs() > DECISION_MARGIN
    assert torch.equal(out.from_teacher[clear], ref.from_teacher[clear])
    assert torch.equal(out.tokens[clear], ref.tokens[clear])


def check_step(s, t, positions, temperature, **kwargs):
    """Kernel step against the float64 reference: tokens exactly, decisions, divergence by error ratio."""
    out = fused_switch_step(s, t, positions, policy=POLICY, temperature=temperature, seed=1234, backend="triton",
                            **kwargs)
    ref = reference.switch_step(s.double(), t.double(), positions, policy=POLICY, temperature=temperature, seed=1234)
    assert out.tokens.dtype == torch.int64 and out.from_teacher.dtype == torch.bool
    assert out.divergence.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert torch.equal(out.student_tokens, ref.student_tokens)
    assert torch.equal(out.teacher_tokens, ref.teacher_tokens)
    assert_same_decisions(out, ref, POLICY.thresholds(positions))
    plain = plain_torch_loss(s, t, "jsd", temperature or 1.0)
    assert_error_ratio("divergence", out.divergence, ref.divergence, plain, LOSS_ATOL[s.dtype])


@pytest.mark.parametrize("rows, vocab, dtype, temperature", [
    (r, v, d, tt) for r, v, dtypes, temps in CASES for d in dtypes for tt in temps], ids=str)
def test_matches_reference(rows, vocab, dtype, temperature, launches):
    s, t = random_logits(rows, vocab, dtype), random_logits(rows, vocab, dtype)
    check_step(s, t, torch.randint(0, 60, (rows,), device=DEVICE), temperature)


def loss_and_grad(s, t, kind, params, splits=None):
    """(kernel, float64 reference, plain torch) per-row loss and gradient under a random upstream."""
    upstream = torch.rand(s.shape[0], device=DEVICE, dtype=torch.float64) + 0.5
    options = {"temperature": 0.9, **params}

    def kernel(x):
        step, grad = switch_step_triton(x.detach(), t, 3, None, policy=POLICY, seed=0, kind=kind,
                                        alpha=options.get("alpha", 0.1), beta=options.get("beta", 0.5),
                                        temperature=0.9, need_grad=True, splits=splits)
        return attach_grad(x, step.loss, grad)

    results = []
    for x, step in [(s, kernel),
                    (s.double(), lambda x: reference.switch_step(x, t.double(), 3, loss=kind, **options).loss),
                    (s, lambda x: plain_torch_loss(x, t, kind, 0.9, **params))]:
        x = x.detach().clone().requires_grad_()
        loss = step(x)
        (grad,) = torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), x)
        results.append((loss.detach(), grad))
    (out, grad), (ref, ref_grad), (plain, plain_grad) = results
    assert grad.dtype == s.dtype
    assert_error_ratio("loss", out, ref, plain, LOSS_ATOL[s.dtype])
    rounding = (ref_grad.to(s.dtype).double() - ref_grad).abs().max().item()  # the output dtype's own
    assert_error_ratio("grad", grad, ref_grad, plain_grad, GRAD_ATOL[s.dtype] + rounding)


@pytest.mark.parametrize("kind, params", KINDS, ids=str)
@pytest.mark.parametrize("rows, vocab, dtype", [(3, 1271, torch.float32), (3, 7, torch.bfloat16),
                                                (3, 7, torch.float16)], ids=str)
def test_loss_and_gradient(rows, vocab, dtype, kind, params, launches):
    loss_and_grad(random_logits(rows, vocab, dtype), random_logits(rows, vocab, dtype), kind, params)


@pytest.mark.parametrize("block", sorted(GPU_TILES))
def test_every_gpu_tile_matches_reference(block, launches):
    """Each tile config the GPU autotuner may pick: tokens, decisions, divergence, loss and gradient."""
    s, t = random_logits(2, 20000, torch.bfloat16), random_logits(2, 20000, torch.bfloat16)
    with only_config(GPU_TILES[block]):
        check_step(s, t, torch.tensor([0, 9], device=DEVICE), 0.8)
        loss_and_grad(s, t, "srkl", {"alpha": 0.2}, splits=4)
        top = switch_step_triton(s, t, 0, None, policy=SwitchPolicy("topk", top_k=50), temperature=1.0, seed=0,
                                 kind="fkl", alpha=0.1, beta=0.5, need_grad=False, splits=4)[0]
    rank = (t > t.gather(1, top.student_tokens[:, None])).sum(1)
    assert torch.equal(top.from_teacher, rank >= 50)


@pytest.mark.parametrize("temperature, policy", [(1.0, POLICY), (0.0, POLICY), (0.8, SwitchPolicy("topk", top_k=30))],
                         ids=str)
def test_packed_rows_match_bf16_rows(temperature, policy, launches):
    """Rows read as int32 words (``kernel_rows``) give the step of the same rows read as bf16: the same tokens and
    decisions, and divergence, loss and gradient bit for bit in the interpreter (within rounding on CUDA:
    ``assert_same_values``), with a partial tile per chunk and the teacher logit at (odd and even) student tokens for
    topk."""
    s, t = random_logits(4, 3008, torch.bfloat16), random_logits(4, 3008, torch.bfloat16)
    assert kernel_rows(s)[0].dtype == torch.int32 and kernel_rows(strided_copy(s))[0].dtype == torch.bfloat16
    given = torch.tensor([0, 1, 2048, 3007], device=DEVICE) if policy.kind == "topk" else None
    outs = [switch_step_triton(a, b, torch.arange(4, device=DEVICE), None, policy=policy, temperature=temperature,
                               seed=2, kind="srkl", alpha=0.1, beta=0.5, need_grad=True, student_tokens=given)
            for a, b in ((s, t), (strided_copy(s), strided_copy(t)))]
    (packed, grad), (plain, grad_plain) = outs
    for name in packed._fields:
        assert_same_values(getattr(packed, name), getattr(plain, name), name)
    assert_same_values(grad, grad_plain, "gradient")
    if given is not None:  # the ranks read the teacher logit at each token, either half of a word
        rank = (t > t.gather(1, given[:, None])).sum(1)
        assert torch.equal(packed.from_teacher, rank >= policy.top_k)


@pytest.mark.parametrize("temperature, policy, kind, given, splits", [
    (1.0, POLICY, "fkl", False, 4), (0.0, POLICY, "jsd", False, 3),
    (0.7, SwitchPolicy("topk", top_k=40), "srkl", True, 4), (1.0, SwitchPolicy("always"), "tvd", False, 1)], ids=str)
def test_one_launch_matches_three(temperature, policy, kind, given, splits):
    """The one-launch step (phase 1, a meeting per row, phase 2, the row's last program deciding) gives the three
    launches' tokens and decisions exactly, and their divergence, loss and gradient up to summation order."""
    s, t = random_logits(5, 3001), random_logits(5, 3001)
    tokens = torch.randint(0, 3001, (5,), device=DEVICE) if given else None
    outs = [switch_step_triton(s, t, torch.arange(5, device=DEVICE), None, policy=policy, temperature=temperature,
                               seed=3, kind=kind, alpha=0.1, beta=0.5, need_grad=True, splits=splits,
                               student_tokens=tokens, fused=fused) for fused in (False, True)]
    (three, grad3), (one, grad1) = outs
    for name in ("tokens", "from_teacher", "student_tokens", "teacher_tokens"):
        assert torch.equal(getattr(one, name), getattr(three, name)), name
    torch.testing.assert_close(one.divergence, three.divergence, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(one.loss, three.loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad1, grad3)


def test_host_integer_helpers_match_triton():
    """The launchers' plain-Python ``ceil_div`` / ``next_pow2`` give triton's ``cdiv`` / ``next_power_of_2``."""
    import triton

    from switchkd.ops.spec import ceil_div, next_pow2

    for n in [1, 2, 3, 7, 8, 9, 1023, 1024, 1025, 50257, 128256, 151936, 2**31 - 1]:
        assert next_pow2(n) == triton.next_power_of_2(n)
        for d in (1, 3, 128, 1024, 4096):
            assert ceil_div(n, d) == triton.cdiv(n, d)
    assert ceil_div(0, 128) == 0


def test_one_launch_splits_fit_the_gpu_at_once(monkeypatch):
    """A row's programs in the one launch wait for one another, so its plan never cuts a row into more programs than
    the GPU holds at once (one per multiprocessor), even when asked to; three launches may."""
    from switchkd.kernels import split

    # the bound holds for every config: one program at the register cap fits an SM's 64K registers
    assert all(c.num_warps * 32 * (c.maxnreg or 255) <= 65536 for c in split.switch_step_configs())
    cuda = torch.device("cuda", 0)
    for sms in (20, 132):
        monkeypatch.setattr(split, "_sm_count", lambda index, sms=sms: sms)
        assert split.resident_splits(cuda) == sms
        for rows in (1, 4, 256):
            wide = split.split_plan(rows, 128256, cuda, programs_per_sm=8)[0]
            capped = split.split_plan(rows, 128256, cuda, programs_per_sm=8, max_splits=sms)[0]
            assert capped <= sms and capped == min(wide, capped)
        assert split.split_plan(1, 128256, cuda, splits=1000, max_splits=sms)[0] <= sms
        if sms == 20:  # where the cap bites: uncapped, one row would take more programs than the card holds
            assert split.split_plan(1, 128256, cuda, programs_per_sm=8)[0] > sms
    assert split.resident_splits(torch.device("cpu")) == split.MAX_SPLITS  # the interpreter runs the halves apart


@pytest.mark.parametrize("rows", [1, 32, 64, 256, 1024])
def test_split_plan_fills_a_gpu_with_chunks_of_whole_tiles(rows, monkeypatch):
    """The switch step's plan on a 132-multiprocessor GPU: at least 2 programs per multiprocessor, 8 once rows allow
    chunks of 4096 columns or more, and never a last trip per chunk that is mostly empty (31 splits of V = 128256
    gave 4.1 tiles per chunk: 23.8 µs against 18.3 at B = 32 on an H200)."""
    from switchkd.kernels import split

    monkeypatch.setattr(split, "_sm_count", lambda index: 132)
    splits, chunk = split.split_plan(rows, 128256, torch.device("cuda"), programs_per_sm=8)
    assert rows * splits >= 2 * 132 or chunk <= 2048
    assert rows * splits >= 8 * 132 or -(-128256 // splits) < 8192  # twice the splits: chunks under 4096
    assert splits * chunk >= 128256 > (splits - 1) * chunk
    if chunk >= 4096:
        assert chunk % 1024 == 0 or chunk % 1024 >= 512
    if rows >= 32:  # long chunks come in whole trips of the widest tile (split.TRIP_ALIGN)
        assert chunk % 2048 == 0


def test_tokens_do_not_depend_on_the_split_count():
    s, t = random_logits(2, 5000), random_logits(2, 5000)
    for temperature in (1.0, 0.0):
        first, *others = [switch_step_triton(s, t, 4, None, policy=POLICY, temperature=temperature, seed=5, kind="jsd",
                                             alpha=0.1, beta=0.5, need_grad=False, splits=splits)[0]
                          for splits in (1, 3, 7)]
        for other in others:
            assert torch.equal(first.student_tokens, other.student_tokens)
            assert torch.equal(first.teacher_tokens, other.teacher_tokens)
            torch.testing.assert_close(first.divergence, other.divergence, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("policy", [POLICY, SwitchPolicy("topk", top_k=5)], ids=["exp", "topk"])
@pytest.mark.parametrize("splits", [1, 3])
def test_given_student_tokens_replace_the_student_sample(policy, splits, backend, launches):
    """``student_tokens=`` (a decoder's drafts): kept where the policy does not switch, ranked by topk, and the
    teacher's sample, the divergence, the loss and its gradient are those of the sampled call."""
    s, t = random_logits(9, 1271), random_logits(9, 1271)
    positions = torch.arange(9, device=DEVICE)
    options = {"policy": policy, "temperature": 0.8, "seed": 7, "loss": "jsd", "backend": backend}
    sampled = fused_switch_step(s, t, positions, **options)
    given = torch.randint(0, 1271, (9,), device=DEVICE)
    if backend == "triton":
        out = switch_step_triton(s, t, positions, None, policy=policy, temperature=0.8, seed=7, kind="jsd", alpha=0.1,
                                 beta=0.5, need_grad=False, splits=splits, student_tokens=given)[0]
    else:
        out = fused_switch_step(s, t, positions, student_tokens=given, **options)
    assert torch.equal(out.student_tokens, given) and torch.equal(out.teacher_tokens, sampled.teacher_tokens)
    torch.testing.assert_close(out.divergence, sampled.divergence)
    ref = reference.switch_step(s.double(), t.double(), positions, policy=policy, temperature=0.8, seed=7,
                                student_tokens=given)
    clear = (ref.divergence.double() - policy.thresholds(positions)).abs() > DECISION_MARGIN
    assert torch.equal(out.from_teacher[clear], ref.from_teacher[clear])
    assert torch.equal(out.tokens, torch.where(out.from_teacher, sampled.teacher_tokens, given))
    same = fused_switch_step(s, t, positions, student_tokens=sampled.student_tokens, **options)
    assert torch.equal(same.tokens, sampled.tokens) and torch.equal(same.loss, sampled.loss)


@pytest.mark.parametrize("kind", ["exp", "linear", "constant", "never", "always"])
def test_threshold_policies_decide_at_their_thresholds(kind, backend):
    policy = SwitchPolicy(kind, tau0=0.2, decay=0.01)
    s = random_logits(32, 301)
    t = s + random_logits(32, 301, spread=(0.0, 1.5))  # divergences from ~0 to large
    positions = torch.arange(32, device=DEVICE) % 16
    out = fused_switch_step(s, t, positions, policy=policy, backend=backend)
    thresholds = policy.thresholds(positions)
    expected = out.divergence.double() > thresholds
    clear = (out.divergence.double() - thresholds).abs() > DECISION_MARGIN
    assert torch.equal(out.from_teacher[clear], expected[clear])
    assert torch.equal(out.tokens, torch.where(out.from_teacher, out.teacher_tokens, out.student_tokens))
    if kind in ("exp", "linear"):
        assert 0 < out.from_teacher.sum() < 32, "the test data should exercise both decisions"


@pytest.mark.parametrize("top_k", [1, 5, 40])
def test_topk_keeps_student_tokens_in_the_teacher_top_k(top_k, launches):
    s, t = random_logits(12, 97), random_logits(12, 97)
    out = fused_switch_step(s, t, 0, policy=SwitchPolicy("topk", top_k=top_k), backend="triton")
    rank = (t > t.gather(1, out.student_tokens[:, None])).sum(1)
    assert torch.equal(out.from_teacher, rank >= top_k)
    ref = reference.switch_step(s.double(), t.double(), 0, policy=SwitchPolicy("topk", top_k=top_k))
    assert torch.equal(out.tokens, ref.tokens)


def test_sampling_is_a_pure_function_of_seed_key_and_position(backend):
    s, t = random_logits(8, 500), random_logits(8, 500)

    def step(*args, **kwargs):
        return fused_switch_step(*args, backend=backend, **kwargs)

    a = step(s, t, 5, seed=7)
    assert torch.equal(a.tokens, step(s, t, 5, seed=7).tokens)
    assert not torch.equal(a.student_tokens, step(s, t, 5, seed=8).student_tokens)
    assert not torch.equal(a.student_tokens, step(s, t, 6, seed=7).student_tokens)
    # Rows carry their noise with their key: permuting rows and keys together permutes the tokens.
    perm = torch.randperm(8, device=DEVICE)
    b = step(s[perm], t[perm], 5, seed=7, row_keys=perm)
    assert torch.equal(b.student_tokens, a.student_tokens[perm])
    assert torch.equal(b.teacher_tokens, a.teacher_tokens[perm])


def test_greedy_is_argmax(backend, launches):
    s, t = random_logits(5, 1271), random_logits(5, 1271)
    s[0, 700] = s[0, 1200] = s[0].max() + 1  # a tie across splits goes to the lowest index
    out = fused_switch_step(s, t, 0, temperature=0.0, backend=backend)
    assert torch.equal(out.student_tokens, s.argmax(-1)) and out.student_tokens[0] == 700
    assert torch.equal(out.teacher_tokens, t.argmax(-1))


def test_greedy_ties_within_a_chunk_go_to_the_lowest_column(launches):
    """One chunk of several tiles (the one launch's statistics sweep takes two tiles per trip, as one group): a tie
    between two tiles of a trip goes to the lower column."""
    s, t = random_logits(2, 4200), random_logits(2, 4200)
    s[0, 700] = s[0, 1200] = s[0].max() + 1  # tiles 0 and 1 (of 1024 columns)
    t[1, 2100] = t[1, 3500] = t[1].max() + 1  # tiles 2 and 3
    step = switch_step_triton(s, t, 0, None, policy=POLICY, temperature=0.0, seed=0, kind="fkl", alpha=0.1, beta=0.5,
                              need_grad=False, splits=1)[0]
    assert torch.equal(step.student_tokens, s.argmax(-1)) and step.student_tokens[0] == 700
    assert torch.equal(step.teacher_tokens, t.argmax(-1)) and step.teacher_tokens[1] == 2100


def chi2_sf_even_dof(x, dof):
    """Survival function of the chi-square distribution for an even number of degrees of freedom."""
    half = x / 2
    return math.exp(-half) * sum(half**k / math.factorial(k) for k in range(dof // 2))


def assert_frequencies_match(tokens, logits, temperature):
    """Chi-square goodness of fit; fails when the p-value is below 1e-6 (a correct sampler: once in 1e6 seeds)."""
    vocab = logits.shape[-1]
    counts = torch.bincount(tokens, minlength=vocab).double()
    expected = torch.softmax(logits.double() / temperature, -1) * tokens.numel()
    stat = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2_sf_even_dof(stat, vocab - 1) > 1e-6, f"chi2 = {stat:.1f}"


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_sampled_frequencies_match_the_softmax(temperature):
    """20000 reference draws (V = 7, 6 degrees of freedom) fit the softmax; the kernel draws the very
    same tokens on a subset."""
    draws = 20000
    row = torch.tensor([1.5, 0.2, -0.3, 0.9, -1.2, 0.0, 0.5], device=DEVICE)
    s = row.expand(draws, 7).contiguous()
    t = s.flip(-1).contiguous()
    ref = reference.switch_step(s, t, 0, temperature=temperature, seed=11)
    assert_frequencies_match(ref.student_tokens, row, temperature)
    assert_frequencies_match(ref.teacher_tokens, row.flip(-1), temperature)
    out = fused_switch_step(s[:24], t[:24], 0, temperature=temperature, seed=11, backend="triton")
    assert torch.equal(out.student_tokens, ref.student_tokens[:24])
    assert torch.equal(out.teacher_tokens, ref.teacher_tokens[:24])


def test_noise_hash_matches_between_python_ints_and_tensors():
    keys = torch.tensor([0, 1, 2**31, 2**32 - 1, 12345])
    assert reference.mix32(keys).tolist() == [reference.mix32(k) for k in keys.tolist()]
    many = torch.arange(4096)
    u = reference.row_uniform(3, many, torch.zeros_like(many), 0)
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02
    assert not torch.equal(u, reference.row_uniform(3, many, torch.zeros_like(many), 1))  # each model its own


def test_inverse_cdf_edges():
    """The first column with probability whose running sum passes u; past the total (rounding) the last such
    column; a row without probability (NaN) gives 0."""
    probs = torch.tensor([[0.0, 0.25, 0.0, 0.75, 0.0]] * 4 + [[float("nan")] * 5], dtype=torch.float64)
    u = torch.tensor([0.1, 0.25, 0.9, 1.0, 0.5], dtype=torch.float64)
    assert reference.inverse_cdf(probs, u).tolist() == [1, 3, 3, 3, 0]


@pytest.mark.parametrize("splits", [1, 5])
def test_kernel_draws_follow_the_softmax_across_splits(splits):
    """200 draws of both models (a row key each) over a row whose 7 live columns lie in different splits (of 128
    columns) fit the softmax (chi-square), never land on a -inf column, and are the reference's tokens."""
    live = torch.tensor([0, 100, 130, 250, 300, 420, 519], device=DEVICE)
    weights = torch.tensor([1.5, 0.2, -0.3, 0.9, -1.2, 0.0, 0.5], device=DEVICE)
    row = torch.full((520,), -float("inf"), device=DEVICE).index_put_((live,), weights)
    s = row.expand(200, -1).contiguous()
    t = torch.full_like(row, -float("inf")).index_put_((live,), weights.flip(0)).expand(200, -1).contiguous()
    keys = torch.arange(200, device=DEVICE) * 7919
    step = switch_step_triton(s, t, 2, keys, policy=POLICY, temperature=0.8, seed=4, kind="fkl", alpha=0.1,
                              beta=0.5, need_grad=False, splits=splits)[0]
    ref = reference.switch_step(s.double(), t.double(), 2, temperature=0.8, seed=4, row_keys=keys)
    assert torch.equal(step.student_tokens, ref.student_tokens)
    assert torch.equal(step.teacher_tokens, ref.teacher_tokens)
    for tokens, model_weights in ((step.student_tokens, weights), (step.teacher_tokens, weights.flip(0))):
        assert torch.isin(tokens, live).all()
        assert_frequencies_match(torch.searchsorted(live, tokens), model_weights, 0.8)


def test_gradient_flows_only_when_asked(backend):
    s = random_logits(4, 100).requires_grad_()
    out = fused_switch_step(s, random_logits(4, 100), 0, backend=backend)
    assert out.loss.requires_grad and not out.divergence.requires_grad
    with torch.no_grad():
        assert not fused_switch_step(s, random_logits(4, 100), 0, backend=backend).loss.requires_grad


def test_non_finite_logits_raise_naming_the_argument(backend):
    s, t = random_logits(4, 700), random_logits(4, 700)
    t[2, 5] = float("nan")
    with pytest.raises(ValueError, match=r"teacher_logits .* row\(s\) \[2\]"):
        fused_switch_step(s, t, 0, backend=backend)
    s[1] = float("-inf")
    with pytest.raises(ValueError, match="student_logits"):
        fused_switch_step(s, random_logits(4, 700), 0, backend=backend)


def test_without_the_finite_check_bad_rows_are_nan_and_never_switch(backend):
    s, t = random_logits(4, 700), random_logits(4, 700)
    t[2, 5] = float("inf")
    out = fused_switch_step(s, t, 0, policy=SwitchPolicy("always"), check_finite=False, backend=backend)
    assert out.divergence[2].isnan() and torch.isfinite(out.divergence[[0, 1, 3]]).all()
    assert out.from_teacher.tolist() == [True, True, False, True]
    with pytest.raises(ValueError, match=r"teacher_logits .* row\(s\) \[2\]"):
        raise_on_bad_rows(out.divergence, s, t)


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
        (lambda s, t: fused_switch_step(s, t, 0, student_tokens=torch.zeros(3, dtype=torch.long)), ValueError,
         "student_tokens"),
        (lambda s, t: fused_switch_step(s, t, 0, student_tokens=torch.zeros(4)), TypeError, "student_tokens"),
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
