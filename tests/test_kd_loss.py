import contextlib
import math

import pytest
import torch
import triton

from switchkd import kd_loss, reference
from switchkd.kernels import kd_loss as kd_kernels
from switchkd.kernels import split as split_kernels
from switchkd.kernels import switch_step as step_kernels
from switchkd.ops.kd_loss import kd_loss_triton
from switchkd.ops.spec import kernel_rows
from switchkd.ops.stored_grad import attach_grad

from conftest import DEVICE, assert_error_ratio, assert_same_values, random_logits

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Absolute slack on top of the error-ratio bound: loss values (nats), gradients.
LOSS_ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-4, torch.float16: 1e-4}
GRAD_ATOL = {torch.float32: 1e-7, torch.bfloat16: 1e-6, torch.float16: 1e-6}
KINDS = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.5}), ("jsd", {"beta": 0.3}), ("skl", {"alpha": 0.1}),
         ("srkl", {"alpha": 0.2}), ("tvd", {})]
# (rows, vocab, dtypes, kinds): one program per row (V = 1, 7; B = 256), vocabulary splits (the rest).
CASES = [
    (3, 7, DTYPES, KINDS),
    (1, 1, [torch.float32], KINDS),
    (3, 1271, [torch.float32, torch.bfloat16], KINDS),
    (256, 7, [torch.bfloat16], [KINDS[3]]),
    (1, 50257, [torch.float16], [KINDS[5]]),
    (1, 151936, [torch.bfloat16], [KINDS[2]]),
]
AUTOTUNED = [split_kernels._stats_kernel, split_kernels._grad_kernel, kd_kernels._kd_loss_kernel,
             kd_kernels._kd_loss_split_kernel, step_kernels._switch_step_kernel, step_kernels._switch_step_fused_kernel]
# Every tile the autotuner can pick on a GPU (warps and stages do not change what the interpreter computes).
GPU_TILES = {c.kwargs["BLOCK"]: c for c in split_kernels.gpu_tile_configs()}


@contextlib.contextmanager
def only_config(config):
    """Every autotuned kernel runs ``config``'s tile within the block."""
    saved = [(k, k.configs, dict(k.cache)) for k in AUTOTUNED]
    for kernel in AUTOTUNED:
        kernel.configs = [triton.Config(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)]
        kernel.cache.clear()
    try:
        yield
    finally:
        for kernel, configs, cache in saved:
            kernel.configs = configs
            kernel.cache.clear()
            kernel.cache.update(cache)


def plain_torch_loss(s, t, kind, temperature, **params):
    """What a user would write in PyTorch at the input dtype: the error baseline."""
    log_ps = torch.log_softmax(s / temperature, -1)
    log_pt = torch.log_softmax(t / temperature, -1)
    return reference.row_divergence(log_ps, log_pt, kind, **params)


def run_rows(s, t, kind, params, temperature=1.0, kernel=None):
    """Per-row loss and its gradient under a random upstream gradient: (kernel, float64 ref, plain torch)."""
    upstream = torch.rand(s.shape[0], dtype=torch.float64, device=s.device) + 0.5
    results = []
    for fn, x, y in [
        (kernel or (lambda a, b: kd_loss(a, b, kind=kind, temperature=temperature, reduction="none", **params)), s, t),
        (lambda a, b: reference.kd_loss(a, b, kind=kind, temperature=temperature, reduction="none", **params),
         s.double(), t.double()),
        (lambda a, b: plain_torch_loss(a, b, kind, temperature, **params), s, t),
    ]:
        x = x.detach().clone().requires_grad_()
        rows = fn(x, y)
        (grad,) = torch.autograd.grad((rows * upstream.to(rows.dtype)).sum(), x)
        results.append((rows.detach(), grad))
    return results


def check_rows(s, t, kind, params, temperature=1.3, kernel=None):
    (out, grad), (ref, ref_grad), (plain, plain_grad) = run_rows(s, t, kind, params, temperature, kernel)
    assert out.dtype == torch.float32 and grad.dtype == s.dtype
    assert_error_ratio("loss", out, ref, plain, LOSS_ATOL[s.dtype])
    # plus the rounding of the exact gradient to the output dtype, which no kernel can beat
    rounding = (ref_grad.to(s.dtype).double() - ref_grad).abs().max().item()
    assert_error_ratio("grad", grad, ref_grad, plain_grad, GRAD_ATOL[s.dtype] + rounding)


@pytest.mark.parametrize("rows, vocab, dtype, kind, params", [
    (r, v, d, k, p) for r, v, dtypes, kinds in CASES for d in dtypes for k, p in kinds], ids=str)
def test_matches_reference(rows, vocab, dtype, kind, params):
    check_rows(random_logits(rows, vocab, dtype), random_logits(rows, vocab, dtype), kind, params)


@pytest.mark.parametrize("block", sorted(GPU_TILES))
@pytest.mark.parametrize("rows, vocab, splits", [(2, 9001, 1), (2, 20000, 4)])
def test_every_gpu_tile_matches_reference(rows, vocab, splits, block):
    """Each tile config the GPU autotuner may pick, through the per-row kernel and the split kernels."""
    s, t = random_logits(rows, vocab, torch.bfloat16), random_logits(rows, vocab, torch.bfloat16)

    def kernel(x, y):
        out, grad = kd_loss_triton(x.detach(), y, None, kind="jsd", alpha=0.1, beta=0.3, temperature=1.3,
                                   ignore_index=-100, need_grad=True, splits=splits)
        return attach_grad(x, out, grad)

    with only_config(GPU_TILES[block]):
        check_rows(s, t, "jsd", {"beta": 0.3}, kernel=kernel)


ROW_TILES = {c.kwargs["BLOCK"]: c for c in split_kernels.row_kernel_configs()}


@pytest.mark.parametrize("rows, vocab", [(11, 3001), (256, 7)])
@pytest.mark.parametrize("block", sorted(ROW_TILES))
def test_row_kernel_with_ignored_rows_matches_reference(block, rows, vocab):
    """The per-row kernel in each of its tiles gives every kept row its loss and gradient, and ignored rows zero."""
    s, t = random_logits(rows, vocab, torch.bfloat16), random_logits(rows, vocab, torch.bfloat16)
    labels = torch.arange(rows, device=DEVICE) % vocab
    labels[1::5] = -100

    def kernel(x, y):
        out, grad = kd_loss_triton(x.detach(), y, labels, kind="srkl", alpha=0.2, beta=0.5, temperature=1.3,
                                   ignore_index=-100, need_grad=True, splits=1)
        return attach_grad(x, out, grad)

    with only_config(ROW_TILES[block]):
        (out, grad), (ref, ref_grad), (plain, plain_grad) = run_rows(s, t, "srkl", {"alpha": 0.2}, 1.3, kernel)
    keep = labels != -100
    assert (out[~keep] == 0).all() and (grad[~keep] == 0).all()
    assert_error_ratio("loss", out[keep], ref[keep], plain[keep], LOSS_ATOL[s.dtype])
    rounding = (ref_grad.to(s.dtype).double() - ref_grad).abs().max().item()
    assert_error_ratio("grad", grad[keep], ref_grad[keep], plain_grad[keep], GRAD_ATOL[s.dtype] + rounding)


@pytest.mark.parametrize("vocab, offset, capped", [(128256, 0, True), (50257, 0, False), (128256, 1, False)])
def test_register_capped_configs_only_for_aligned_rows(vocab, offset, capped):
    """The configs capped below 128 registers fit only with 16-byte vector loads: the autotuner keeps them when
    V, the strides and the pointers are multiples of 16, and drops them otherwise (where they would spill)."""
    s = torch.zeros(2, vocab + offset, dtype=torch.bfloat16)[:, offset:]
    args = {"s_ptr": s, "t_ptr": s, "grad_ptr": s, "s_stride": s.stride(0), "t_stride": s.stride(0),
            "grad_stride": s.stride(0), "V": vocab, "chunk": vocab}
    configs = split_kernels.row_kernel_configs()
    kept = split_kernels.prune_tiles(configs, {}, **args)
    assert any(split_kernels.needs_alignment(c) for c in configs)
    assert any(split_kernels.needs_alignment(c) for c in kept) == capped
    assert all(split_kernels.needs_alignment(c) for c in configs if c not in kept)  # nothing else is dropped


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("kind, params", [KINDS[0], KINDS[3], KINDS[5]], ids=str)
def test_gradient_written_over_the_student_logits(kind, params, splits):
    """``grad_out=`` the student logits (what fused_linear_kd_loss does): the same loss and gradient, bit for bit,
    on the per-row kernel and the split kernels, ignored rows included."""
    s, t = random_logits(5, 1271, torch.bfloat16), random_logits(5, 1271, torch.bfloat16)
    labels = torch.tensor([3, -100, 0, 7, -100], device=DEVICE)
    args = {"kind": kind, "alpha": params.get("alpha", 0.1), "beta": params.get("beta", 0.5), "temperature": 1.3,
            "ignore_index": -100, "need_grad": True, "splits": splits}
    rows, grad = kd_loss_triton(s, t, labels, **args)
    buffer = s.clone()
    rows_in_place, grad_in_place = kd_loss_triton(buffer, t, labels, grad_out=buffer, **args)
    assert grad_in_place.data_ptr() == buffer.data_ptr()
    assert torch.equal(rows_in_place, rows) and torch.equal(grad_in_place, grad)
    with pytest.raises(ValueError, match="grad_out"):
        kd_loss_triton(s, t, labels, grad_out=buffer.float(), **args)


def strided_copy(x, pad=2):
    """``x`` in rows ``pad`` columns longer: the same values, but a row stride that is no multiple of 32, so the
    kernels read them as bf16, not as int32 words (``kernel_rows``)."""
    out = torch.empty(x.shape[0], x.shape[1] + pad, dtype=x.dtype, device=x.device)[:, :x.shape[1]]
    return out.copy_(x)


def test_kernel_rows_packs_only_aligned_bf16_pairs():
    """bf16 rows go to the kernels as int32 words of two columns when every tile stays 16-byte aligned as words: V
    even, the row stride a multiple of 32 (any even stride for one row), an aligned base."""
    x = torch.zeros(4, 128, dtype=torch.bfloat16, device=DEVICE)
    words, stride = kernel_rows(x)
    assert words.dtype == torch.int32 and words.shape == (4, 64) and stride == 64
    assert words.data_ptr() == x.data_ptr()
    one_row = torch.zeros(1, 130, dtype=torch.bfloat16, device=DEVICE)[:, :128]
    words, stride = kernel_rows(one_row)
    assert words.dtype == torch.int32 and words.shape == (1, 64) and stride == 65
    for plain in (x.float(), x.half(), torch.zeros(4, 127, dtype=torch.bfloat16, device=DEVICE), strided_copy(x),
                  torch.zeros(4, 129, dtype=torch.bfloat16, device=DEVICE)[:, 1:]):
        rows, stride = kernel_rows(plain)
        assert rows is plain and stride == plain.stride(0)


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("kind, params", [KINDS[0], KINDS[3], KINDS[5]], ids=str)
def test_packed_rows_match_bf16_rows(kind, params, splits):
    """Rows read as int32 words give the loss and gradient of the same rows read as bf16, bit for bit in the
    interpreter and within rounding on CUDA (a partial tile and ignored rows included), and so does the gradient
    written over packed student logits."""
    s, t = random_logits(5, 1280, torch.bfloat16), random_logits(5, 1280, torch.bfloat16)
    assert kernel_rows(s)[0].dtype == torch.int32
    labels = torch.tensor([3, -100, 0, 7, -100], device=DEVICE)
    args = {"kind": kind, "alpha": params.get("alpha", 0.1), "beta": params.get("beta", 0.5), "temperature": 1.3,
            "ignore_index": -100, "need_grad": True, "splits": splits}
    rows, grad = kd_loss_triton(s, t, labels, **args)
    rows_bf16, grad_bf16 = kd_loss_triton(strided_copy(s), strided_copy(t), labels, **args)
    assert_same_values(rows, rows_bf16, "loss")
    assert_same_values(grad, grad_bf16, "gradient")
    buffer = s.clone()
    rows_in_place, grad_in_place = kd_loss_triton(buffer, t, labels, grad_out=buffer, **args)
    assert_same_values(rows_in_place, rows, "loss in place")
    assert_same_values(grad_in_place, grad, "gradient in place")


def test_in_place_guard_restores_the_logits_after_each_timing_run():
    """The autotuner's hooks: aliased logits are saved before a timing run and restored after it; else no copy."""
    guard = split_kernels.InPlaceGradGuard()
    logits = torch.randn(3, 5)
    original = logits.clone()
    guard.before({"s_ptr": logits, "grad_ptr": logits})
    logits.zero_()  # what a timing run does to aliased logits
    guard.after({"s_ptr": logits, "grad_ptr": logits}, exception=None)
    assert torch.equal(logits, original) and guard.saved is None
    guard.before({"s_ptr": logits, "grad_ptr": torch.empty_like(logits)})
    guard.before({"s_ptr": logits, "grad_ptr": logits}, reset_only=True)
    assert guard.saved is None


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reductions_and_ignore_index(reduction, splits, backend, monkeypatch):
    s = random_logits(2 * 19, 523).view(2, 19, 523)
    t = random_logits(2 * 19, 523).view(2, 19, 523)
    labels = torch.randint(0, 523, (2, 19), device=DEVICE)
    labels[0, :7] = -100
    labels[1, 11:] = -100
    xs = [s.clone().requires_grad_(), s.double().requires_grad_()]
    plan = split_kernels.split_plan
    monkeypatch.setattr(split_kernels, "split_plan", lambda rows, vocab, device, n=None: plan(rows, vocab, device,
                                                                                               splits))
    out = kd_loss(xs[0], t, labels, kind="srkl", reduction=reduction, backend=backend)
    ref = reference.kd_loss(xs[1], t.double(), labels, kind="srkl", reduction=reduction)
    upstream = torch.rand(()) + 0.5
    (grad,) = torch.autograd.grad(out * upstream, xs[0])
    (ref_grad,) = torch.autograd.grad(ref * upstream, xs[1])
    assert out.shape == () and out.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    assert (grad[labels == -100] == 0).all() and (grad[labels != -100] != 0).any()


def test_unit_upstream_leaves_the_stored_gradient_alone(backend):
    """backward() of a mean/sum loss needs no pass over the gradient: the kernel already applied the weight."""
    s = random_logits(6, 300).requires_grad_()
    t = random_logits(6, 300)
    kd_loss(s, t, kind="jsd", backend=backend).backward()
    x = s.detach().double().requires_grad_()
    reference.kd_loss(x, t.double(), kind="jsd").backward()
    torch.testing.assert_close(s.grad.double(), x.grad, rtol=1e-4, atol=1e-7)


def test_all_ignored_mean_is_zero_with_zero_grad(backend):
    s = random_logits(5, 64).requires_grad_()
    loss = kd_loss(s, random_logits(5, 64), torch.full((5,), -100, device=DEVICE), reduction="mean", backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and (s.grad == 0).all()


def test_leading_dims_and_none_shape(backend):
    s, t = random_logits(12, 33).view(3, 4, 33), random_logits(12, 33).view(3, 4, 33)
    out = kd_loss(s, t, kind="fkl", reduction="none", backend=backend)
    assert out.shape == (3, 4)
    ref = reference.kd_loss(s.double(), t.double(), kind="fkl", reduction="none")
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta, twin", [(0.0, "fkl"), (1.0, "rkl")])
def test_jsd_ends_are_fkl_and_rkl(beta, twin, backend):
    s, t = random_logits(9, 300), random_logits(9, 300)
    torch.testing.assert_close(kd_loss(s, t, kind="jsd", beta=beta, backend=backend),
                               kd_loss(s, t, kind=twin, backend=backend))


def test_symmetric_jsd_is_symmetric_and_bounded(backend):
    s, t = random_logits(17, 1271, spread=(0.5, 30.0)), random_logits(17, 1271, spread=(0.5, 30.0))
    a = kd_loss(s, t, kind="jsd", beta=0.5, reduction="none", backend=backend)
    b = kd_loss(t, s, kind="jsd", beta=0.5, reduction="none", backend=backend)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert (a >= -1e-6).all() and (a <= math.log(2) + 1e-6).all()


@pytest.mark.parametrize("rows", [4, 1])  # one program per row / vocabulary splits
def test_masked_vocabulary_entries_stay_finite(rows, backend):
    s, t = random_logits(rows, 600), random_logits(rows, 600)
    s[:, 450:] = float("-inf")
    t[:, 450:] = float("-inf")
    for kind in reference.LOSS_KINDS:
        x = s.clone().requires_grad_()
        loss = kd_loss(x, t, kind=kind, backend=backend)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(x.grad).all(), kind
        assert (x.grad[:, 450:] == 0).all()


@pytest.mark.parametrize("rows", [4, 1])
@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_probabilities_below_float32_keep_their_exact_logs(kind, rows, backend):
    """At a low temperature most probabilities underflow to 0 while their log-ratios run to thousands of nats; the
    KL terms of the columns one model still gives mass to use the exact logs, as the float64 reference does."""
    s, t = random_logits(rows, 600), random_logits(rows, 600)
    x = s.clone().requires_grad_()
    loss = kd_loss(x, t, kind=kind, temperature=0.02, reduction="none", backend=backend)
    ref = reference.kd_loss(s.double(), t.double(), kind=kind, temperature=0.02, reduction="none")
    assert (ref > 20).all(), "the data should put mass where the other model's probability underflows"
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("rows", [4, 1])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_logits_give_a_nan_loss(bad, rows, backend):
    s, t = random_logits(rows, 600), random_logits(rows, 600)
    t[-1, 3] = bad
    x = s.clone().requires_grad_()
    out = kd_loss(x, t, kind="srkl", reduction="none", backend=backend)
    assert out[-1].isnan() and torch.isfinite(out[:-1]).all()
    out.sum().backward()  # the bad row's gradient is NaN, as autograd's is; the others stay finite
    assert x.grad[-1].isnan().all() and torch.isfinite(x.grad[:-1]).all()


def test_second_backward_through_the_same_graph_raises():
    s = random_logits(3, 50).requires_grad_()
    loss = kd_loss(s, random_logits(3, 50), backend="triton")
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
