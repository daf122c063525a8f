"""The static-shape decode path (CUDA graphs on CUDA, the same steps uncaptured on CPU) against the eager path."""

import pytest
import torch

from switchkd import SwitchGenerator, SwitchPolicy
from switchkd.decoding.graphs import bucket

from models import pair

MIXED = SwitchPolicy("exp", tau0=0.55, decay=0.02)
RAGGED = [[5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16], [3, 4], [20] * 11]


def assert_same(a, b):
    assert a.responses == b.responses
    assert torch.equal(a.from_teacher, b.from_teacher)
    assert torch.equal(a.divergence.isnan(), b.divergence.isnan())
    assert torch.equal(a.divergence.nan_to_num(), b.divergence.nan_to_num())
    assert torch.equal(a.sequences, b.sequences)


@pytest.mark.parametrize("draft_len", [1, 4])
def test_static_path_gives_exactly_the_eager_tokens(draft_len):
    """float64, sampling on, ragged prompts (5 rows: 8 lanes), EOS that stops some rows early (then 4 lanes)."""
    teacher, student = pair("llama")
    kwargs = {"policy": MIXED, "max_new_tokens": 14, "seed": 11, "draft_len": draft_len, "adaptive_draft": False}
    eager = SwitchGenerator(teacher, student, block_size=4, cuda_graphs=False).generate(RAGGED, **kwargs)
    eos = eager.responses[0][4]
    eager = SwitchGenerator(teacher, student, block_size=4, cuda_graphs=False).generate(RAGGED, eos_token_id=eos,
                                                                                        **kwargs)
    assert 0.0 < eager.teacher_share < 1.0 and min(map(len, eager.responses)) < 14
    static_gen = SwitchGenerator(teacher, student, block_size=4, cuda_graphs=True)
    static = static_gen.generate(RAGGED, eos_token_id=eos, **kwargs)
    assert_same(static, eager)
    assert static.teacher_forwards == eager.teacher_forwards
    (workspace,) = static_gen.static.workspaces.values()
    assert {8, 4} <= set(workspace.lanes), "finished rows leave the lanes: the batch shrinks to a smaller bucket"
    assert all(c.manager.num_used_blocks == 0 and c.manager.num_sequences == 0 for c in static_gen.caches)


def test_workspaces_are_reused_across_requests_and_sub_batches():
    teacher, student = pair("gpt2")
    gen = SwitchGenerator(teacher, student, block_size=4, num_blocks=12, cuda_graphs=True)
    first = gen.generate(RAGGED, policy=MIXED, max_new_tokens=8, seed=2)  # a tight pool: several sub-batches
    count = len(gen.static.workspaces)
    second = gen.generate(RAGGED, policy=MIXED, max_new_tokens=8, seed=2)
    assert len(gen.static.workspaces) == count
    assert_same(first, second)
    roomy = SwitchGenerator(teacher, student, block_size=4, cuda_graphs=False).generate(RAGGED, policy=MIXED,
                                                                                       max_new_tokens=8, seed=2)
    assert_same(first, roomy)
    assert all(c.manager.num_used_blocks == 0 for c in gen.caches)


def test_moved_weights_drop_the_workspaces_their_graphs_read():
    """A graph replays fixed addresses: after the weights are re-allocated, every workspace is built again."""
    teacher, student = pair("gpt2")
    gen = SwitchGenerator(teacher, student, block_size=4, cuda_graphs=True)
    first = gen.generate(RAGGED, policy=MIXED, max_new_tokens=6, seed=4)
    (before,) = gen.static.workspaces.values()
    gen.generate(RAGGED, policy=MIXED, max_new_tokens=6, seed=4)
    assert next(iter(gen.static.workspaces.values())) is before
    student.load_state_dict({k: v.clone() for k, v in student.state_dict().items()}, assign=True)
    again = gen.generate(RAGGED, policy=MIXED, max_new_tokens=6, seed=4)
    assert next(iter(gen.static.workspaces.values())) is not before
    assert_same(again, first)


def test_autocast_state_gets_its_own_workspace():
    """Autocast is baked into a captured graph like the request's constants: a request under autocast must not
    replay graphs captured without it."""
    teacher, student = pair("llama")
    gen = SwitchGenerator(teacher, student, block_size=4, cuda_graphs=True)
    gen.generate(RAGGED[:2], policy=MIXED, max_new_tokens=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gen.generate(RAGGED[:2], policy=MIXED, max_new_tokens=2)
    assert len(gen.static.workspaces) == 2


def test_workspaces_past_eight_evict_the_least_recently_used():
    teacher, student = pair("llama")
    gen = SwitchGenerator(teacher, student, block_size=4, cuda_graphs=True)
    kwargs = {"policy": MIXED, "max_new_tokens": 2, "draft_len": 1}
    gen.generate(RAGGED[:1], seed=0, **kwargs)
    kept = next(iter(gen.static.workspaces.values()))
    for seed in range(1, 9):  # each seed is its own request, so its own workspace
        gen.generate(RAGGED[:1], seed=seed, **kwargs)
        gen.generate(RAGGED[:1], seed=0, **kwargs)  # seed 0 stays the most recently used
    assert len(gen.static.workspaces) == 8
    assert any(ws is kept for ws in gen.static.workspaces.values())


def test_bucket_sizes():
    assert [bucket(n) for n in (1, 2, 3, 4, 5, 9, 64, 65)] == [1, 2, 4, 4, 8, 16, 64, 128]


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@cuda
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_captured_graphs_give_the_eager_tokens_on_cuda(dtype):
    teacher, student = (m.cuda() for m in pair("llama", dtype=dtype))
    kwargs = {"policy": MIXED, "max_new_tokens": 16, "seed": 5, "draft_len": 4, "adaptive_draft": False}
    eager = SwitchGenerator(teacher, student, block_size=4, cuda_graphs=False).generate(RAGGED, **kwargs)
    gen = SwitchGenerator(teacher, student, block_size=4)
    assert gen.cuda_graphs
    for _ in range(2):  # the second request replays the graphs captured by the first
        assert_same(gen.generate(RAGGED, **kwargs), eager)
    assert gen.static.capture and gen.static.workspaces


@cuda
def test_uncapturable_model_falls_back_to_eager_steps_with_a_warning():
    teacher, student = (m.cuda() for m in pair("gpt2"))
    forward = student.forward

    def syncing_forward(*args, **kwargs):
        kwargs["input_ids"].sum().item()  # a host sync: not allowed while capturing
        return forward(*args, **kwargs)

    student.forward = syncing_forward
    try:
        eager = SwitchGenerator(teacher, student, cuda_graphs=False).generate(RAGGED, policy=MIXED, max_new_tokens=6)
        gen = SwitchGenerator(teacher, student)
        with pytest.warns(UserWarning, match="CUDA-graph capture failed"):
            out = gen.generate(RAGGED, policy=MIXED, max_new_tokens=6)
        assert torch.cuda.current_stream() == torch.cuda.default_stream(), "the failed capture left its stream current"
        torch.randint(0, 9, (4,), device="cuda")  # raises while the generator is still in capture mode
        again = gen.generate(RAGGED, policy=MIXED, max_new_tokens=6)  # the eager path, without a second warning
    finally:
        del student.forward
    assert_same(out, eager)
    assert_same(again, eager)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_teacher_hidden_states_give_the_teacher_logits_of_each_generated_token(family, cuda_graphs):
    """``return_teacher_hidden``: the teacher's LM head of each kept hidden state is the full-sequence teacher's
    logits at the position that predicts that token (after switches, rollbacks, EOS and sub-batches); zeros past the
    end; the tokens are those of a call without it."""
    teacher, student = pair(family, dtype=torch.float64)
    kwargs = {"policy": MIXED, "max_new_tokens": 9, "draft_len": 4, "eos_token_id": 3}
    gen = SwitchGenerator(teacher, student, block_size=4, num_blocks=12, cuda_graphs=cuda_graphs)
    out = gen.generate(RAGGED, return_teacher_hidden=True, **kwargs)
    assert torch.equal(out.sequences, gen.generate(RAGGED, **kwargs).sequences)
    assert 0 < out.teacher_share < 1
    head = teacher.get_output_embeddings().weight
    for b, prompt in enumerate(RAGGED):
        n = len(out.responses[b])
        full = teacher(input_ids=torch.tensor([prompt + out.responses[b]])).logits[0, len(prompt) - 1:][:n]
        torch.testing.assert_close(out.teacher_hidden[b, :n] @ head.T, full, rtol=1e-9, atol=1e-9)
        assert (out.teacher_hidden[b, n:] == 0).all()
