import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from switchkd._C import BlockManager


def check_invariants(manager, lengths):
    """No block owned twice, free + owned = total, block lists agree with the lengths."""
    owned = [b for i in lengths for b in manager.blocks(i)]
    assert len(owned) == len(set(owned))
    assert manager.num_free_blocks + len(owned) == manager.num_blocks
    assert manager.num_used_blocks == len(owned)
    for i, n in lengths.items():
        assert manager.length(i) == n
        assert len(manager.blocks(i)) >= -(-n // manager.block_size)
    if lengths:
        ids = sorted(lengths)
        table = manager.block_table(ids)
        for row, i in enumerate(ids):
            blocks = manager.blocks(i)
            assert table[row, : len(blocks)].tolist() == blocks
            assert (table[row, len(blocks):] == -1).all()


operations = st.lists(
    st.tuples(st.sampled_from(["add", "append", "truncate", "free", "reserve"]), st.integers(0, 5),
              st.integers(0, 40)),
    max_size=60,
)


@settings(max_examples=150, deadline=None)
@given(ops=operations, block_size=st.integers(1, 8), num_blocks=st.integers(1, 30))
def test_random_operations_keep_the_accounting_exact(ops, block_size, num_blocks):
    manager = BlockManager(num_blocks, block_size)
    lengths = {}
    for op, seq, n in ops:
        free_before = manager.num_free_blocks
        try:
            if op == "add":
                manager.add(seq)
                lengths[seq] = 0
            elif op == "append":
                slots = manager.append([seq], [n])
                start = lengths[seq]
                lengths[seq] += n
                assert slots.tolist() == manager.slot_mapping([seq], [start], n).flatten().tolist()
            elif op == "truncate":
                manager.truncate(seq, n)
                lengths[seq] = n
            elif op == "free":
                manager.free(seq)
                del lengths[seq]
            else:
                manager.reserve(seq, n)
        except (ValueError, RuntimeError):
            assert manager.num_free_blocks == free_before, "a failed operation changed the state"
        check_invariants(manager, lengths)
    for seq in list(lengths):
        manager.free(seq)
    assert manager.num_free_blocks == num_blocks and manager.num_sequences == 0


def test_slots_address_the_sequence_blocks():
    manager = BlockManager(10, 4)
    manager.add(7)
    slots = manager.append([7], [6]).tolist()
    blocks = manager.blocks(7)
    assert slots == [blocks[p // 4] * 4 + p % 4 for p in range(6)]
    manager.truncate(7, 3)
    assert manager.blocks(7) == blocks[:1] and manager.num_free_blocks == 9
    assert manager.lengths([7]).tolist() == [3]


def test_batched_append_is_all_or_nothing():
    manager = BlockManager(3, 2)
    manager.add(0)
    manager.add(1)
    with pytest.raises(RuntimeError, match="out of KV blocks: need 4 more, 3 of 3 free"):
        manager.append([0, 1], [4, 3])
    assert manager.num_free_blocks == 3 and manager.length(0) == 0


@pytest.mark.parametrize(
    "misuse, match",
    [
        (lambda m: m.add(0), "already registered"),
        (lambda m: m.append([5], [1]), "unknown sequence id 5"),
        (lambda m: m.append([0, 0], [1, 1]), "listed twice"),
        (lambda m: m.append([0], [-1]), "counts must be >= 0"),
        (lambda m: m.append([0], [100]), "out of KV blocks"),
        (lambda m: m.truncate(0, 3), "cannot truncate to 3"),
        (lambda m: m.free(9), "unknown sequence id 9"),
        (lambda m: m.block_table([3]), "unknown sequence id 3"),
        (lambda m: m.slot_mapping([0], [0], 9), "outside its"),
        (lambda m: m.reserve(0, 1000), "out of KV blocks"),
        (lambda m: BlockManager(0, 4), "num_blocks"),
        (lambda m: BlockManager(4, 0), "block_size"),
    ],
)
def test_misuse_raises_with_a_message(misuse, match):
    manager = BlockManager(4, 4)
    manager.add(0)
    manager.append([0], [2])
    with pytest.raises((ValueError, RuntimeError), match=match):
        misuse(manager)


def test_batched_truncate_validates_before_changing_anything():
    manager = BlockManager(8, 2)
    for i in (0, 1):
        manager.add(i)
    manager.append([0, 1], [5, 3])
    with pytest.raises(ValueError, match="cannot truncate to 4"):
        manager.truncate([0, 1], [1, 4])
    assert manager.lengths([0, 1]).tolist() == [5, 3]
    manager.truncate([0, 1], [1, 2])
    assert manager.lengths([0, 1]).tolist() == [1, 2] and manager.num_used_blocks == 2


def test_prepare_matches_its_parts():
    manager = BlockManager(16, 4)
    for i in (3, 4):
        manager.add(i)
    manager.append([3], [5])
    slots, rows, positions, table, lengths, mask = manager.prepare([3, 4], [2, 3])
    assert slots.tolist() == manager.slot_mapping([3], [5], 2).flatten().tolist() + manager.slot_mapping(
        [4], [0], 3).flatten().tolist()
    assert rows.tolist() == [0, 1, 3, 4, 5]
    assert positions.tolist() == [[5, 6, 6], [0, 1, 2]]
    assert lengths.tolist() == [7, 3]
    assert table.tolist() == manager.block_table([3, 4]).clamp_min(0).tolist()
    # Sequence 3 (7 tokens, 2 new): queries see keys 0..5 and 0..6; the pad query sees all 7.
    assert mask[0, 0].sum(-1).tolist() == [6, 7, 7]
    assert mask[1, 0].sum(-1).tolist() == [1, 2, 3]
