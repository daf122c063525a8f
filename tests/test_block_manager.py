import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchkd._C import BlockManager


class Model:
    """What the manager should hold: each sequence's blocks (as last reported by prepare) and length."""

    def __init__(self, manager):
        self.manager, self.blocks, self.lengths = manager, {}, {}

    def prepare(self, ids, counts):
        slots, rows, positions, table, lengths = self.manager.prepare(ids, counts)
        bs, width = self.manager.block_size, max(counts)
        starts = [self.lengths[i] for i in ids]
        for b, i in enumerate(ids):
            self.lengths[i] += counts[b]
            self.blocks[i] = table[b, : -(-self.lengths[i] // bs)].tolist()
        expected = [self.blocks[i][p // bs] * bs + p % bs for b, i in enumerate(ids)
                    for p in range(starts[b], starts[b] + counts[b])]
        assert slots.tolist() == expected
        assert rows.tolist() == [b * width + j for b, n in enumerate(counts) for j in range(n)]
        assert lengths.tolist() == [self.lengths[i] for i in ids]
        expected = [[s + min(j, n - 1) for j in range(width)] for s, n in zip(starts, counts, strict=True)]
        assert positions.tolist() == expected
        return table

    def truncate(self, ids, new_lengths):
        self.manager.truncate(ids, new_lengths)
        for i, n in zip(ids, new_lengths, strict=True):
            self.lengths[i] = n
            self.blocks[i] = self.blocks[i][: -(-n // self.manager.block_size)]

    def check(self):
        """No block owned twice; the used count equals the blocks the sequences own."""
        owned = [b for blocks in self.blocks.values() for b in blocks]
        assert len(owned) == len(set(owned)) and all(0 <= b < self.manager.num_blocks for b in owned)
        assert self.manager.num_used_blocks == len(owned)
        assert self.manager.num_sequences == len(self.lengths)


operations = st.lists(
    st.tuples(st.sampled_from(["add", "prepare", "truncate", "free"]), st.lists(st.integers(0, 5), min_size=1,
                                                                                 max_size=3),
              st.integers(0, 40)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=operations, block_size=st.integers(1, 8), num_blocks=st.integers(1, 30))
def test_random_operations_keep_the_accounting_exact(ops, block_size, num_blocks):
    manager = BlockManager(num_blocks, block_size)
    model = Model(manager)
    for op, seqs, n in ops:
        used_before = manager.num_used_blocks
        try:
            if op == "add":
                manager.add(seqs[0])
                model.lengths[seqs[0]], model.blocks[seqs[0]] = 0, []
            elif op == "prepare":
                model.prepare(seqs, [max(1, n - 3 * j) for j in range(len(seqs))])
            elif op == "truncate":
                model.truncate(seqs, [n] * len(seqs))
            else:
                manager.free(seqs)
                for i in seqs:
                    del model.lengths[i], model.blocks[i]
        except (ValueError, RuntimeError):
            assert manager.num_used_blocks == used_before, "a failed operation changed the state"
        model.check()
    manager.free(list(model.lengths))
    assert manager.num_used_blocks == 0 and manager.num_sequences == 0


def test_rollback_frees_whole_blocks_past_the_new_length():
    manager = BlockManager(10, 4)
    manager.add(7)
    table = manager.prepare([7], [6])[3]
    manager.truncate([7], [3])
    assert manager.num_used_blocks == 1
    slots, _, positions, table_after, lengths = manager.prepare([7], [1])
    assert table_after[0, 0] == table[0, 0] and slots.tolist() == [table[0, 0] * 4 + 3]
    assert positions.tolist() == [[3]] and lengths.tolist() == [4]


def test_prepare_fixed_width_table_and_numpy_outputs():
    manager = BlockManager(16, 4)
    for i in (3, 4):
        manager.add(i)
    manager.prepare([3], [5])
    slots, rows, positions, table, lengths = manager.prepare([3, 4], [2, 3], table_width=5, pad_block=16)
    assert all(isinstance(a, np.ndarray) and a.dtype == np.int64 for a in (slots, rows, positions, table, lengths))
    assert table.shape == (2, 5) and (table[0, 2:] == 16).all() and (table[1, 1:] == 16).all()
    assert rows.tolist() == [0, 1, 3, 4, 5]
    assert positions.tolist() == [[5, 6, 6], [0, 1, 2]]
    assert lengths.tolist() == [7, 3]
    with pytest.raises(ValueError, match="needs 3 blocks, more than table_width 2"):
        manager.prepare([3], [4], table_width=2)
    assert manager.num_used_blocks == 3


def test_batched_prepare_is_all_or_nothing():
    manager = BlockManager(3, 2)
    manager.add(0)
    manager.add(1)
    with pytest.raises(RuntimeError, match="out of KV blocks: need 4 more, 3 of 3 free"):
        manager.prepare([0, 1], [4, 3])
    assert manager.num_used_blocks == 0
    assert manager.prepare([0], [1])[4].tolist() == [1]


@pytest.mark.parametrize(
    "misuse, error, match",
    [
        (lambda m: m.add(0), ValueError, "already registered"),
        (lambda m: m.prepare([5], [1]), ValueError, "unknown sequence id 5"),
        (lambda m: m.prepare([0, 0], [1, 1]), ValueError, "listed twice"),
        (lambda m: m.prepare([0], [0]), ValueError, "at least one new token"),
        (lambda m: m.prepare([0], [1, 2]), ValueError, "1 ids but 2 counts"),
        (lambda m: m.prepare([], []), ValueError, "no sequences"),
        (lambda m: m.prepare([0], [100]), RuntimeError, "out of KV blocks"),
        (lambda m: m.truncate([0], [3]), ValueError, "cannot truncate to 3"),
        (lambda m: m.truncate([0, 0], [1, 1]), ValueError, "listed twice"),
        (lambda m: m.free([9]), ValueError, "unknown sequence id 9"),
        (lambda m: BlockManager(0, 4), ValueError, "num_blocks"),
        (lambda m: BlockManager(4, 0), ValueError, "block_size"),
    ],
)
def test_misuse_raises_with_a_message(misuse, error, match):
    manager = BlockManager(4, 4)
    manager.add(0)
    manager.prepare([0], [2])
    with pytest.raises(error, match=match):
        misuse(manager)


def test_batched_truncate_and_free_validate_before_changing_anything():
    manager = BlockManager(8, 2)
    for i in (0, 1):
        manager.add(i)
    manager.prepare([0, 1], [5, 3])
    with pytest.raises(ValueError, match="cannot truncate to 4"):
        manager.truncate([0, 1], [1, 4])
    assert manager.num_used_blocks == 5
    with pytest.raises(ValueError, match="unknown sequence id 2"):
        manager.free([0, 2])
    assert manager.num_sequences == 2
    manager.truncate([0, 1], [1, 2])
    assert manager.num_used_blocks == 2
