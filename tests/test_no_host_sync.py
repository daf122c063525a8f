"""The ops never make the host wait for the GPU (CUDA only: the interpreter has no stream to wait on).

``torch.cuda.set_sync_debug_mode("error")`` raises on every synchronising call, including the hidden ones
(``.item()``, ``torch.tensor(..., device="cuda")``, pageable copies). Each op runs once first, outside the mode:
the autotuner's first call times its configs, which syncs by design.
"""

import pytest
import torch

import switchkd

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

ROWS, VOCAB, HIDDEN = 8, 4099, 64


def _kd_loss(labels, reduction):
    s = torch.randn(ROWS, VOCAB, device="cuda", requires_grad=True)
    t = torch.randn(ROWS, VOCAB, device="cuda")

    def step():
        s.grad = None
        switchkd.kd_loss(s, t, labels, kind="jsd", reduction=reduction).sum().backward()
    return step


def _linear_kd():
    hs = torch.randn(ROWS, HIDDEN, device="cuda", requires_grad=True)
    ht = torch.randn(ROWS, HIDDEN, device="cuda")
    ws, wt = torch.randn(VOCAB, HIDDEN, device="cuda") / 8, torch.randn(VOCAB, HIDDEN, device="cuda") / 8

    def step():
        hs.grad = None
        switchkd.fused_linear_kd_loss(hs, ws, ht, wt, kind="jsd").backward()
    return step


def _switch_step():
    s, t = torch.randn(ROWS, VOCAB, device="cuda"), torch.randn(ROWS, VOCAB, device="cuda")
    pos = torch.arange(ROWS, device="cuda")
    return lambda: switchkd.fused_switch_step(s, t, pos, check_finite=False)


def _sample():
    logits = torch.randn(ROWS, VOCAB, device="cuda")
    return lambda: switchkd.sample(logits, torch.arange(ROWS, device="cuda"))


@pytest.mark.parametrize("make_step", [
    lambda: _kd_loss(None, "mean"),
    lambda: _kd_loss(torch.tensor([0, -100, 2, 3, -100, 5, 6, 7], device="cuda"), "mean"),
    lambda: _kd_loss(None, "none"),
    _linear_kd,
    _switch_step,
    _sample,
], ids=["kd_loss_mean", "kd_loss_labels", "kd_loss_none", "fused_linear_kd_loss", "fused_switch_step", "sample"])
def test_op_runs_without_a_host_sync(make_step):
    step = make_step()
    step()  # autotuning and compilation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
