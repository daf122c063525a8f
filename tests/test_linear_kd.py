import pytest
import torch

from switchkd import fused_linear_kd_loss, kd_loss, reference
from switchkd.ops.linear_kd import CPU_CHUNK_BYTES, LIVE_BUFFERS, MAX_CHUNK_BYTES, default_chunk_rows
from switchkd.ops.stored_grad import scaled_copy

from conftest import DEVICE, assert_error_ratio

KINDS = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.3}), ("skl", {"alpha": 0.1}), ("srkl", {"alpha": 0.2}),
         ("tvd", {})]
TOL = {torch.float32: {"rtol": 1e-4, "atol": 1e-6}, torch.float64: {"rtol": 1e-9, "atol": 1e-12}}
# Absolute slack on top of the bf16 error-ratio bound: loss (nats), gradients.
BF16_ATOL = {"loss": 1e-4, "hidden": 1e-5, "weight": 1e-5, "bias": 1e-5}


def inputs(rows=37, vocab=211, h_s=24, h_t=40, bias=True, dtype=torch.float32):
    """Student/teacher (hidden, weight, bias) in ``dtype`` and labels with every 4th position ignored."""
    def head(width):
        hidden = torch.randn(rows, width, dtype=torch.float64)
        weight = torch.randn(vocab, width, dtype=torch.float64) / width**0.5 * 3
        b = torch.randn(vocab, dtype=torch.float64) if bias else None
        return [None if x is None else x.to(DEVICE, dtype) for x in (hidden, weight, b)]

    labels = torch.randint(0, vocab, (rows,), device=DEVICE)
    labels[::4] = -100
    return head(h_s), head(h_t), labels


def plain_loss(student, teacher, labels, reduction, loss_args):
    """kd_loss on materialised logits, written with plain PyTorch ops at the inputs' dtype."""
    (hs, ws, bs), (ht, wt, bt) = student, teacher
    s_logits = hs @ ws.T + (0 if bs is None else bs)
    t_logits = ht @ wt.T + (0 if bt is None else bt)
    temperature = loss_args.pop("temperature", 1.0)
    log_ps = torch.log_softmax(s_logits / temperature, -1)
    log_pt = torch.log_softmax(t_logits / temperature, -1)
    keep = labels != -100
    rows = torch.where(keep, reference.row_divergence(log_ps, log_pt, **loss_args), 0.0)
    return {"none": rows, "sum": rows.sum(), "mean": rows.sum() / keep.sum().clamp_min(1)}[reduction]


def run(fn, student, teacher, labels, reduction, upstream, dtype=None):
    """Loss and the gradients w.r.t. the student's (hidden, weight, bias), at ``dtype`` if given."""
    student = [None if x is None else x.detach().to(dtype or x.dtype).requires_grad_() for x in student]
    teacher = [None if x is None else x.detach().to(dtype or x.dtype) for x in teacher]
    loss = fn(student, teacher, labels, reduction)
    grads = torch.autograd.grad((loss * upstream.to(loss.dtype)).sum(), [x for x in student if x is not None])
    return (loss.detach(), *grads)


def fused(backend, chunk_rows=8, **loss_args):
    def fn(student, teacher, labels, reduction):
        return fused_linear_kd_loss(student[0], student[1], teacher[0], teacher[1], labels, reduction=reduction,
                                    student_bias=student[2], teacher_bias=teacher[2], chunk_rows=chunk_rows,
                                    backend=backend, **loss_args)
    return fn


def upstream_for(reduction, rows):
    shape = (rows,) if reduction == "none" else ()
    return (torch.rand(shape, dtype=torch.float64) + 0.5).to(DEVICE)


@pytest.mark.parametrize("backend, dtype", [("reference", torch.float64), ("reference", torch.float32),
                                            ("triton", torch.float32)], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("kind, params", KINDS, ids=str)
def test_matches_float64_kd_loss_on_full_logits(kind, params, reduction, bias, backend, dtype):
    student, teacher, labels = inputs(bias=bias, dtype=torch.float64)
    upstream = upstream_for(reduction, labels.shape[0])
    loss_args = {"kind": kind, "temperature": 1.4, **params}

    def full_logits(student, teacher, labels, reduction):
        (hs, ws, bs), (ht, wt, bt) = student, teacher
        s_logits, t_logits = hs @ ws.T, ht @ wt.T
        if bias:
            s_logits, t_logits = s_logits + bs, t_logits + bt
        return reference.kd_loss(s_logits, t_logits, labels, reduction=reduction, **loss_args)

    want = run(full_logits, student, teacher, labels, reduction, upstream)
    got = run(fused(backend, **loss_args), student, teacher, labels, reduction, upstream, dtype)
    assert got[0].shape == want[0].shape and len(got) == len(want) == (4 if bias else 3)
    for name, g, w in zip(["loss", "hidden", "weight", "bias"], got, want, strict=False):
        assert g.dtype == (torch.float32 if name == "loss" and dtype != torch.float64 else dtype), name
        torch.testing.assert_close(g.double(), w, **TOL[dtype], msg=lambda m, name=name: f"{name}: {m}")


# 41 rows in 3 and 4 chunks (bf16 weight-gradient accumulator) and in 6 (float32 accumulator).
@pytest.mark.parametrize("chunk_rows", [16, 11, 8], ids=["3_chunks", "4_chunks", "6_chunks"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("kind, params", [("fkl", {}), ("jsd", {"beta": 0.5}), ("srkl", {"alpha": 0.1})], ids=str)
def test_bf16_error_within_twice_plain_torch(kind, params, reduction, chunk_rows):
    """bf16 matmuls + fused loss vs plain PyTorch at bf16 (matmuls and loss), both against float64."""
    student, teacher, labels = inputs(rows=41, vocab=1271, h_s=64, h_t=96, dtype=torch.float64)
    upstream = upstream_for(reduction, labels.shape[0])
    loss_args = {"kind": kind, "temperature": 1.3, **params}
    ref = run(lambda *a: plain_loss(*a, dict(loss_args)), student, teacher, labels, reduction, upstream)
    plain = run(lambda *a: plain_loss(*a, dict(loss_args)), student, teacher, labels, reduction, upstream,
                torch.bfloat16)
    got = run(fused("triton", chunk_rows=chunk_rows, **loss_args), student, teacher, labels, reduction, upstream,
              torch.bfloat16)
    for name, g, r, p in zip(["loss", "hidden", "weight", "bias"], got, ref, plain, strict=True):
        assert g.dtype == (torch.float32 if name == "loss" else torch.bfloat16), name
        assert_error_ratio(name, g, r, p, BF16_ATOL[name])


@pytest.mark.parametrize("dtype, chunk_rows, acc, folded", [
    (torch.bfloat16, 11, torch.bfloat16, True), (torch.bfloat16, 41, torch.bfloat16, True),
    (torch.bfloat16, 10, torch.float32, True), (torch.float16, 11, torch.float32, False),
    (torch.float32, 11, torch.float32, True)], ids=str)
def test_weight_gradient_accumulator_dtype_and_folded_mean_weight(monkeypatch, dtype, chunk_rows, acc, folded):
    """bf16 with at most 4 row chunks accumulates dW in bf16, more chunks (and fp16) in float32; the mean's
    1 / kept rows reaches the kernel as its gradient weight except for fp16 (scaled in backward instead)."""
    from switchkd.ops import linear_kd

    accs, weights = [], []

    def mm_spy(acc, a, b, first):
        accs.append(acc.dtype)
        return real_mm(acc, a, b, first)

    def kernel_spy(*args, weight=None, **kwargs):
        weights.append(None if weight is None else weight.item())
        return real_kernel(*args, weight=weight, **kwargs)

    real_mm, real_kernel = linear_kd._mm_into, linear_kd.kd_loss_triton
    monkeypatch.setattr(linear_kd, "_mm_into", mm_spy)
    monkeypatch.setattr(linear_kd, "kd_loss_triton", kernel_spy)
    (hs, ws, _), (ht, wt, _), labels = inputs(rows=41, vocab=67, h_s=8, h_t=6, bias=False, dtype=dtype)
    ws.requires_grad_()
    fused_linear_kd_loss(hs, ws, ht, wt, labels, kind="jsd", chunk_rows=chunk_rows, backend="triton").backward()
    n_chunks = -(-41 // chunk_rows)
    assert accs == [acc] * n_chunks and ws.grad.dtype == dtype
    kept = (labels != -100).sum().item()
    assert weights == ([pytest.approx(1 / kept)] if folded else [None]) * n_chunks


def test_scaled_copy_rounds_once_and_leaves_its_input(backend):
    grad = torch.randn(37, 129, device=DEVICE).to(torch.bfloat16)
    before = grad.clone()
    factor = torch.tensor(1.7 / 3, device=DEVICE)  # not a bf16 number: must stay float32
    for src, dtype in [(grad, torch.bfloat16), (grad.float(), torch.bfloat16), (grad.float(), torch.float32)]:
        got = scaled_copy(src, factor, dtype, backend)
        assert got.dtype == dtype and got.data_ptr() != src.data_ptr()
        exact = src.float() * factor
        # One rounding of the float32 product: to nearest even (GPU, torch), or toward zero (Triton's interpreter).
        toward_zero = (exact.view(torch.int32) & ~0xFFFF).view(torch.float32) if dtype == torch.bfloat16 else exact
        assert ((got == exact.to(dtype)) | (got == toward_zero.to(dtype))).all()
    assert torch.equal(grad, before) and scaled_copy(grad[:0], factor, torch.bfloat16, backend).shape == (0, 129)


def test_each_chunk_gradient_overwrites_its_student_logits(monkeypatch):
    """Two [chunk, V] buffers per chunk on the Triton path: the kernel writes the gradient over the student logits."""
    from switchkd.ops import linear_kd

    calls = []

    def spy(s_logits, t_logits, labels, **kwargs):
        calls.append(kwargs.get("grad_out") is s_logits)
        return real(s_logits, t_logits, labels, **kwargs)

    real = linear_kd.kd_loss_triton
    monkeypatch.setattr(linear_kd, "kd_loss_triton", spy)
    (s_h, s_w, _), (t_h, t_w, _), labels = inputs(rows=9, bias=False)
    s_h.requires_grad_()
    fused_linear_kd_loss(s_h, s_w, t_h, t_w, labels, kind="jsd", chunk_rows=4, backend="triton").backward()
    assert calls == [True] * 3 and LIVE_BUFFERS == 2


@pytest.mark.parametrize("rows, vocab, chunk_rows", [(1, 1, None), (3, 7, 2), (41, 1271, 40), (5, 50257, None)])
def test_awkward_sizes(rows, vocab, chunk_rows, backend):
    student, teacher, labels = inputs(rows=rows, vocab=vocab, h_s=5, h_t=3, dtype=torch.float64)
    upstream = upstream_for("mean", rows)
    want = run(lambda *a: plain_loss(*a, {"kind": "jsd"}), student, teacher, labels, "mean", upstream)
    plain = run(lambda *a: plain_loss(*a, {"kind": "jsd"}), student, teacher, labels, "mean", upstream,
                torch.float32)
    got = run(fused(backend, chunk_rows, kind="jsd"), student, teacher, labels, "mean", upstream, torch.float32)
    for name, g, w, p in zip(["loss", "hidden", "weight", "bias"], got, want, plain, strict=True):
        assert_error_ratio(name, g, w, p, 1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_retain_graph_gives_the_same_gradient_twice(reduction, backend):
    (hs, ws, bs), (ht, wt, bt), labels = inputs(rows=13, vocab=97)
    hs.requires_grad_(), ws.requires_grad_(), bs.requires_grad_()
    loss = fused_linear_kd_loss(hs, ws, ht, wt, labels, reduction=reduction, student_bias=bs, teacher_bias=bt,
                                chunk_rows=5, backend=backend).sum()
    loss.backward(retain_graph=True)
    first = [x.grad.clone() for x in (hs, ws, bs)]
    loss.backward()
    for x, g in zip((hs, ws, bs), first, strict=True):
        torch.testing.assert_close(x.grad, 2 * g)


def test_only_the_inputs_that_need_a_gradient_get_one():
    (hs, ws, bs), (ht, wt, bt), labels = inputs(rows=9, vocab=31)
    ht.requires_grad_(), wt.requires_grad_(), bt.requires_grad_(), ws.requires_grad_()
    fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt).backward()
    assert ws.grad is not None and all(x.grad is None for x in (hs, bs, ht, wt, bt))


def test_all_ignored_mean_is_zero_with_zero_grad():
    (hs, ws, _), (ht, wt, _), labels = inputs(rows=6, vocab=23, bias=False)
    hs.requires_grad_(), ws.requires_grad_()
    loss = fused_linear_kd_loss(hs, ws, ht, wt, torch.full_like(labels, -100), chunk_rows=4)
    loss.backward()
    assert loss.item() == 0 and not hs.grad.any() and not ws.grad.any()


def test_default_chunk_rows_fits_the_budget_in_equal_chunks():
    for n_rows, vocab, dtype in [(8192, 128256, torch.bfloat16), (37, 211, torch.float32), (1, 7, torch.float32),
                                 (0, 5, torch.float32), (1000, 2**30, torch.float32)]:
        rows = default_chunk_rows(n_rows, vocab, dtype, torch.device("cpu"))
        fit = max(1, CPU_CHUNK_BYTES // (LIVE_BUFFERS * vocab * dtype.itemsize))
        assert 1 <= rows <= max(fit, 1)
        assert -(-max(n_rows, 1) // rows) == -(-max(n_rows, 1) // fit)  # no more chunks than needed
    assert default_chunk_rows(37, 211, torch.float32, torch.device("cpu")) == 37
    # The CUDA budget at the size (8192 rows, V=128256, bf16): 4 chunks of 2048 rows.
    assert MAX_CHUNK_BYTES // (LIVE_BUFFERS * 128256 * 2) // 2048 == 1 and -(-8192 // 2048) == 4


def test_leading_dims_none_shape_and_errors():
    (hs, ws, bs), (ht, wt, bt), labels = inputs(rows=12)
    loss = fused_linear_kd_loss(hs.view(3, 4, -1), ws, ht.view(3, 4, -1), wt, labels.view(3, 4))
    torch.testing.assert_close(loss, fused_linear_kd_loss(hs, ws, ht, wt, labels))
    rows = fused_linear_kd_loss(hs.view(3, 4, -1), ws, ht.view(3, 4, -1), wt, labels.view(3, 4), reduction="none")
    assert rows.shape == (3, 4) and rows.dtype == torch.float32 and (rows.view(-1)[labels == -100] == 0).all()
    for kwargs, error, match in [
        ({"teacher_weight": wt[:-1]}, ValueError, "vocabulary mismatch"),
        ({"student_weight": ws[:, :-1]}, ValueError, "hidden sizes"),
        ({"reduction": "avg"}, ValueError, "reduction"),
        ({"chunk_rows": 0}, ValueError, "chunk_rows"),
        ({"student_bias": bs[:-1]}, ValueError, "student_bias"),
        ({"teacher_bias": bt.double()}, TypeError, "teacher_bias"),
        ({"student_weight": ws.double()}, TypeError, "student_weight"),
        ({"teacher_hidden": ht[:-1]}, ValueError, "rows"),
        ({"labels": labels[:-1]}, ValueError, "labels"),
        ({"student_bias": [1.0]}, TypeError, "student_bias"),
    ]:
        args = {"student_hidden": hs, "student_weight": ws, "teacher_hidden": ht, "teacher_weight": wt,
                "labels": labels, **kwargs}
        with pytest.raises(error, match=match):
            fused_linear_kd_loss(**args)


def test_no_grad_mode_computes_the_loss_only():
    (hs, ws, bs), (ht, wt, bt), labels = inputs(rows=11, vocab=53)
    hs.requires_grad_(), ws.requires_grad_()
    want = fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt)
    with torch.no_grad():
        got = fused_linear_kd_loss(hs, ws, ht, wt, labels, student_bias=bs, teacher_bias=bt)
    assert not got.requires_grad
    torch.testing.assert_close(got, want.detach())


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_row_weights_weight_each_position(reduction):
    hs, ws = torch.randn(2, 5, 6, dtype=torch.float64), torch.randn(13, 6, dtype=torch.float64)
    ht, wt = torch.randn(2, 5, 9, dtype=torch.float64), torch.randn(13, 9, dtype=torch.float64)
    weights, labels = torch.rand(2, 5, dtype=torch.float64), torch.randint(0, 13, (2, 5))
    labels[1, 2] = -100
    fused_inputs = [x.clone().requires_grad_() for x in (hs, ws)]
    fused = fused_linear_kd_loss(fused_inputs[0], fused_inputs[1], ht, wt, labels, kind="jsd", reduction=reduction,
                                 row_weights=weights)
    full_inputs = [x.clone().requires_grad_() for x in (hs, ws)]
    rows = kd_loss(full_inputs[0] @ full_inputs[1].T, ht @ wt.T, labels, kind="jsd", reduction="none")
    expected = (rows * weights).sum() / (1 if reduction == "sum" else (labels != -100).sum())
    torch.testing.assert_close(fused, expected)
    fused.backward()
    expected.backward()
    for got, want in zip(fused_inputs, full_inputs, strict=True):
        torch.testing.assert_close(got.grad, want.grad)
