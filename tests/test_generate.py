import functools

import pytest
import torch

from switchkd import SwitchGenerator, SwitchPolicy, switch_generate
from switchkd.decoding.state import accept

from models import CONTEXT, VOCAB, pair, tiny_model

FAMILIES = ["gpt2", "opt", "llama", "qwen2"]
PROMPTS = [[5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16]]
MIXED = SwitchPolicy("exp", tau0=0.55, decay=0.02)  # switches on part of the tokens of these tiny pairs


def hf_greedy(model, prompt, n):
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt):].tolist()


@pytest.fixture(params=[False, True], ids=["eager", "static"])
def generate(request):
    """switch_generate on one step path: eager, or static shapes (CUDA graphs; on CPU without capture)."""
    return functools.partial(switch_generate, cuda_graphs=request.param)


@pytest.fixture(scope="module", params=FAMILIES)
def models(request):
    return pair(request.param)


def test_never_at_temperature_zero_is_the_student_greedy_generate(models, generate):
    teacher, student = models
    out = generate(teacher, student, PROMPTS, policy=SwitchPolicy("never"), temperature=0.0, max_new_tokens=10)
    assert out.responses == [hf_greedy(student, p, 10) for p in PROMPTS]
    assert not out.from_teacher.any()


def test_always_at_temperature_zero_is_the_teacher_greedy_generate(models, generate):
    teacher, student = models
    out = generate(teacher, student, PROMPTS, policy=SwitchPolicy("always"), temperature=0.0, max_new_tokens=10,
                          draft_len=3)
    assert out.responses == [hf_greedy(teacher, p, 10) for p in PROMPTS]
    assert out.teacher_share == 1.0


def test_drafting_returns_the_stepwise_tokens(models, generate):
    teacher, student = models
    stepwise = generate(teacher, student, PROMPTS, policy=MIXED, max_new_tokens=24, draft_len=1, seed=5)
    assert 0.0 < stepwise.teacher_share < 1.0, "the test pair should exercise both kinds of token"
    for adaptive in (False, True):
        drafted = generate(teacher, student, PROMPTS, policy=MIXED, max_new_tokens=24, draft_len=4, seed=5,
                                  adaptive_draft=adaptive)
        assert drafted.responses == stepwise.responses
        assert torch.equal(drafted.from_teacher, stepwise.from_teacher)
        torch.testing.assert_close(drafted.divergence, stepwise.divergence, equal_nan=True)
        assert drafted.teacher_forwards <= stepwise.teacher_forwards


def test_accept_keeps_tokens_up_to_the_first_switch_eos_or_budget():
    tokens = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [1, 2, 3, 4], [3, 3, 3, 3], [7, 1, 1, 1]])
    switched = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [1, 0, 0, 0]]).bool()
    remaining = torch.tensor([10, 10, 2, 0, 4, 9])
    keep, finished = accept(tokens, switched, remaining, torch.tensor([7, 12]))
    assert keep.tolist() == [2, 3, 2, 0, 4, 1]
    assert finished.tolist() == [False, True, True, False, True, True]
    keep, finished = accept(tokens, switched, remaining, torch.tensor([], dtype=torch.int64))
    assert keep.tolist() == [2, 4, 2, 0, 4, 1] and finished.tolist() == [False, False, True, False, True, False]


def test_topk_policy_drafts_like_stepwise(generate):
    teacher, student = pair("gpt2")
    policy = SwitchPolicy("topk", top_k=3)
    a = generate(teacher, student, PROMPTS, policy=policy, max_new_tokens=16, draft_len=1, seed=2)
    b = generate(teacher, student, PROMPTS, policy=policy, max_new_tokens=16, draft_len=5, seed=2,
                        adaptive_draft=False)
    assert a.responses == b.responses


def test_ragged_batch_equals_each_prompt_alone(generate):
    teacher, student = pair("llama")
    batch = generate(teacher, student, PROMPTS, policy=MIXED, max_new_tokens=12, seed=9)
    for i, prompt in enumerate(PROMPTS):
        alone = generate(teacher, student, [prompt], policy=MIXED, max_new_tokens=12, seed=9, row_keys=[i])
        assert alone.responses[0] == batch.responses[i]


def test_padded_input_ids_and_lists_agree(generate):
    teacher, student = pair("gpt2")
    input_ids = torch.tensor([[0, 0, 5, 6, 7, 8], [0, 0, 0, 0, 0, 9], [0, 10, 11, 12, 13, 14]])
    mask = (torch.arange(6) >= torch.tensor([[2], [5], [1]])).long()
    a = generate(teacher, student, input_ids, mask, policy=MIXED, max_new_tokens=8)
    b = generate(teacher, student, [[5, 6, 7, 8], [9], [10, 11, 12, 13, 14]], policy=MIXED, max_new_tokens=8)
    assert a.responses == b.responses and torch.equal(a.sequences, b.sequences)


def test_eos_and_max_new_tokens_stop_each_sequence(generate):
    teacher, student = pair("gpt2")
    free = generate(teacher, student, PROMPTS, policy=MIXED, max_new_tokens=20, seed=4)
    eos = free.responses[0][3]
    out = generate(teacher, student, PROMPTS, policy=MIXED, max_new_tokens=20, seed=4, eos_token_id=eos)
    for row, response in enumerate(out.responses):
        full = free.responses[row]
        stop = full.index(eos) + 1 if eos in full else len(full)
        assert response == full[:stop]
        assert out.response_lengths[row] == stop
        assert torch.isnan(out.divergence[row, stop:]).all() and not out.from_teacher[row, stop:].any()
    assert out.sequences.shape[1] == max(len(p) + len(r) for p, r in zip(PROMPTS, out.responses, strict=True))
    second = free.responses[1][2]
    both = generate(teacher, student, PROMPTS, policy=MIXED, max_new_tokens=20, seed=4,
                           eos_token_id=[eos, second])
    for row, response in enumerate(both.responses):
        full = free.responses[row]
        stop = next((j + 1 for j, t in enumerate(full) if t in (eos, second)), len(full))
        assert response == full[:stop]


def test_pools_are_reused_and_every_block_comes_back(generate):
    teacher, student = pair("qwen2")
    gen = SwitchGenerator(teacher, student, block_size=4, num_blocks=64, **generate.keywords)
    first = gen.generate(PROMPTS, policy=MIXED, max_new_tokens=10, seed=1)
    pools = [id(c) for c in gen.caches]
    second = gen.generate(PROMPTS, policy=MIXED, max_new_tokens=10, seed=1)
    assert [id(c) for c in gen.caches] == pools and first.responses == second.responses
    assert all(c.manager.num_used_blocks == 0 and c.manager.num_sequences == 0 for c in gen.caches)


def test_small_pool_runs_sub_batches_with_the_same_tokens(generate):
    teacher, student = pair("gpt2")
    roomy = generate(teacher, student, PROMPTS, policy=MIXED, max_new_tokens=10, seed=3)
    tight = generate(teacher, student, PROMPTS, policy=MIXED, max_new_tokens=10, seed=3, block_size=4,
                            num_blocks=6)
    assert tight.responses == roomy.responses
    with pytest.raises(ValueError, match="needs 6 KV blocks"):
        generate(teacher, student, PROMPTS, max_new_tokens=10, block_size=4, num_blocks=5)


def test_blocks_come_back_after_an_exception_mid_generation(generate):
    teacher, student = pair("gpt2")
    gen = SwitchGenerator(teacher, student, block_size=4, num_blocks=64, **generate.keywords)
    calls = {"n": 0}
    forward = teacher.forward

    def failing_forward(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom")
        return forward(*args, **kwargs)

    teacher.forward = failing_forward
    try:
        with pytest.raises(RuntimeError, match="boom"):
            gen.generate(PROMPTS, policy=MIXED, max_new_tokens=10)
    finally:
        del teacher.forward
    assert all(c.manager.num_used_blocks == 0 for c in gen.caches)
    assert teacher.config._attn_implementation != "switchkd_paged"
    assert gen.generate(PROMPTS, max_new_tokens=3).response_lengths.tolist() == [3, 3, 3]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"prompts": [[1, 2], []]}, ValueError, r"prompts\[1\] is empty"),
        ({"prompts": []}, ValueError, "prompts is empty"),
        ({"prompts": [[1, "a"]]}, TypeError, r"prompts\[0\]"),
        ({"prompts": [[1, VOCAB]]}, ValueError, "outside"),
        ({"prompts": [[1] * (CONTEXT - 2)], "max_new_tokens": 5}, ValueError, "context"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"draft_len": 0}, ValueError, "draft_len"),
        ({"policy": "exp"}, TypeError, "policy"),
        ({"eos_token_id": VOCAB + 3}, ValueError, "eos_token_id"),
        ({"eos_token_id": [1, "2"]}, ValueError, "eos_token_id"),
        ({"row_keys": [0, 0, 1], "max_new_tokens": 4}, ValueError, "unique"),
        ({"row_keys": [0, 1], "max_new_tokens": 4}, ValueError, "row_keys"),
    ],
)
def test_bad_requests_raise(kwargs, error, match, generate):
    teacher, student = pair("gpt2")
    kwargs = {"prompts": PROMPTS, **kwargs}
    with pytest.raises(error, match=match):
        generate(teacher, student, **kwargs)


def test_vocabulary_mismatch_raises():
    teacher = tiny_model("gpt2")
    student = tiny_model("gpt2")
    student.resize_token_embeddings(VOCAB + 5)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        SwitchGenerator(teacher, student)


def test_triton_switch_step_inside_generation(generate):
    """float32 models: the fused step runs the Triton kernel (interpreter on CPU) inside decoding."""
    teacher, student = pair("llama", dtype=torch.float32)
    greedy = generate(teacher, student, PROMPTS, policy=SwitchPolicy("never"), temperature=0.0,
                             max_new_tokens=8)
    assert greedy.responses == [hf_greedy(student, p, 8) for p in PROMPTS]
    stepwise = generate(teacher, student, PROMPTS, policy=MIXED, max_new_tokens=12, draft_len=1, seed=7)
    drafted = generate(teacher, student, PROMPTS, policy=MIXED, max_new_tokens=12, draft_len=3, seed=7,
                              adaptive_draft=False)
    assert 0.0 < stepwise.teacher_share < 1.0
    assert drafted.responses == stepwise.responses


# ------------------------------------------------------------------- padded LM heads (rows past the tokenizer)
def padded(model, rows: int, scale: float = 60.0):
    """A copy of ``model`` with ``rows`` output rows: the same weights on the first VOCAB, huge ones after."""
    import copy

    model = copy.deepcopy(model)
    model.resize_token_embeddings(rows)
    with torch.no_grad():
        head = model.get_output_embeddings().weight
        head[VOCAB:] = torch.randn(rows - VOCAB, head.shape[1], dtype=head.dtype) * scale
    return model


@pytest.fixture(scope="module")
def padded_pair():
    teacher, student = pair("gpt2")
    return teacher, student, padded(teacher, VOCAB + 3), padded(student, VOCAB + 11)


@pytest.mark.parametrize("draft_len", [1, 4])
@pytest.mark.parametrize("padded_teacher", [False, True], ids=["teacher", "padded_teacher"])
def test_padded_rows_are_never_sampled_and_change_no_token(padded_pair, generate, draft_len, padded_teacher):
    teacher, student, big_teacher, big_student = padded_pair
    big_teacher = big_teacher if padded_teacher else teacher
    request = {"policy": MIXED, "max_new_tokens": 16, "draft_len": draft_len, "adaptive_draft": False, "seed": 3}
    plain = generate(teacher, student, PROMPTS, **request)
    out = generate(big_teacher, big_student, PROMPTS, vocab_size=VOCAB, **request)
    assert 0.0 < plain.teacher_share < 1.0
    assert max(max(r) for r in out.responses) < VOCAB
    assert out.responses == plain.responses
    assert torch.equal(out.from_teacher, plain.from_teacher)
    torch.testing.assert_close(out.divergence, plain.divergence, equal_nan=True)


def test_without_vocab_size_the_padded_rows_are_sampled(padded_pair):
    """The control of the test above: the padded rows' logits are large enough to be drawn."""
    _, _, big_teacher, big_student = padded_pair
    big_teacher = padded(big_teacher, VOCAB + 11)
    out = switch_generate(big_teacher, big_student, PROMPTS, policy=SwitchPolicy("never"), max_new_tokens=8)
    assert max(max(r) for r in out.responses) >= VOCAB


def test_static_buffers_hold_only_the_token_columns(padded_pair):
    teacher, student, _, big_student = padded_pair
    generator = SwitchGenerator(teacher, big_student, cuda_graphs=True, vocab_size=VOCAB)
    out = generator.generate(PROMPTS, policy=MIXED, max_new_tokens=6, draft_len=4, adaptive_draft=False)
    assert max(max(r) for r in out.responses) < VOCAB
    buffers = [lanes.student_logits for ws in generator.static.workspaces.values() for lanes in ws.lanes.values()]
    assert buffers and all(b.shape[-1] == VOCAB for b in buffers)
    logits = torch.zeros(2, 3, VOCAB + 11)
    view = generator._model_pair.tokens_only(logits)
    assert view.shape[-1] == VOCAB and view.data_ptr() == logits.data_ptr()  # a view, no copy


@pytest.mark.parametrize(
    "vocab_size, kwargs, match",
    [
        (VOCAB + 4, {}, "vocab_size=.* exceeds"),  # more than the teacher's rows
        (0, {}, "vocab_size must be"),
        (True, {}, "vocab_size must be"),
        (VOCAB - 10, {"prompts": [[1, VOCAB - 5]]}, "outside"),
        (VOCAB - 10, {"eos_token_id": VOCAB - 2}, "eos_token_id"),
    ],
)
def test_bad_vocab_size_or_ids_past_it_raise(padded_pair, vocab_size, kwargs, match):
    _, _, big_teacher, big_student = padded_pair
    kwargs = {"prompts": PROMPTS, "max_new_tokens": 4, **kwargs}
    with pytest.raises(ValueError, match=match):
        switch_generate(big_teacher, big_student, vocab_size=vocab_size, **kwargs)


def test_rows_may_differ_only_with_vocab_size(padded_pair):
    teacher, _, _, big_student = padded_pair
    with pytest.raises(ValueError, match="vocabulary mismatch.*vocab_size"):
        SwitchGenerator(teacher, big_student)
    assert SwitchGenerator(teacher, big_student, vocab_size=VOCAB).vocab_size == VOCAB
