import pytest
import torch
from test_switch_step import assert_frequencies_match

from switchkd import fused_switch_step, reference, sample
from switchkd.ops.spec import kernel_rows

from conftest import DEVICE, random_logits
from test_kd_loss import strided_copy


@pytest.mark.parametrize("temperature", [1.0, 0.7, 0.0])
def test_sample_draws_the_switch_step_tokens(temperature, backend):
    """``sample`` with model 0 / 1 is the student's / teacher's noise stream of the switch step."""
    s, t = random_logits(3, 1271), random_logits(3, 1271)
    positions, keys = torch.tensor([0, 7, 30], device=DEVICE), torch.tensor([5, 1, 9], device=DEVICE)
    step = fused_switch_step(s, t, positions, temperature=temperature, seed=3, row_keys=keys, backend=backend)
    options = {"temperature": temperature, "seed": 3, "row_keys": keys, "backend": backend}
    assert torch.equal(sample(s, positions, model=0, **options), step.student_tokens)
    assert torch.equal(sample(t, positions, model=1, **options), step.teacher_tokens)


@pytest.mark.parametrize("rows, vocab, dtype", [(3, 7, torch.float16), (1, 50257, torch.bfloat16),
                                                (1, 151936, torch.float32), (3, 1, torch.float32)], ids=str)
def test_kernel_matches_reference(rows, vocab, dtype):
    x = random_logits(rows, vocab, dtype)
    out = sample(x, 4, temperature=0.8, seed=21, backend="triton")
    assert out.dtype == torch.int64
    assert torch.equal(out, reference.sample(x.double(), 4, temperature=0.8, seed=21))
    assert torch.equal(sample(x, 4, temperature=0.0, backend="triton"), x.argmax(-1))


@pytest.mark.parametrize("temperature", [0.8, 0.0])
def test_packed_rows_sample_as_bf16_rows(temperature):
    """bf16 rows read as int32 words (``kernel_rows``) draw the tokens of the same rows read as bf16."""
    x = random_logits(3, 4992, torch.bfloat16)
    assert kernel_rows(x)[0].dtype == torch.int32
    options = {"temperature": temperature, "seed": 4, "backend": "triton"}
    assert torch.equal(sample(x, 2, **options), sample(strided_copy(x), 2, **options))


def test_kernel_frequencies_match_the_softmax():
    """600 kernel draws at V = 7 (a different row key per draw) fit the softmax (chi-square)."""
    row = torch.tensor([1.5, 0.2, -0.3, 0.9, -1.2, 0.0, 0.5], device=DEVICE)
    tokens = sample(row.expand(600, 7).contiguous(), 0, temperature=0.8, seed=2, backend="triton")
    assert_frequencies_match(tokens, row, 0.8)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda x: sample(x[None]), ValueError, r"\[B, V\]"),
        (lambda x: sample(x.long()), TypeError, "logits"),
        (lambda x: sample(x, model=2), ValueError, "model"),
        (lambda x: sample(x, temperature=-0.5), ValueError, "temperature"),
        (lambda x: sample(x, positions=-1), ValueError, "positions"),
        (lambda x: sample(x, seed="0"), TypeError, "seed"),
        (lambda x: sample(x, row_keys=torch.zeros(3, dtype=torch.long)), ValueError, "row_keys"),
    ],
)
def test_bad_input_raises(call, error, match):
    with pytest.raises(error, match=match):
        call(random_logits(4, 10, device="cpu"))
