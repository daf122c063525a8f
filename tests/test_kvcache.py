import pytest
import torch
import torch.nn.functional as F

from switchkd.decoding.kvcache import PagedKVCache, paged_attention


class _Layer(torch.nn.Module):
    layer_idx = 0


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (6, 2)])
def test_paged_attention_equals_sdpa_on_the_same_keys(heads, kv_heads):
    """Ragged prefill then a uniform step: each sequence's output equals causal SDPA over its own tokens."""
    head_dim, block_size = 8, 3
    lengths = [5, 1, 9]
    cache = PagedKVCache(num_blocks=12, block_size=block_size)
    ids = [10, 11, 12]
    for i in ids:
        cache.manager.add(i)
    q = torch.randn(3, heads, 11, head_dim, dtype=torch.float64)
    k = torch.randn(3, kv_heads, 11, head_dim, dtype=torch.float64)
    v = torch.randn(3, kv_heads, 11, head_dim, dtype=torch.float64)
    layer = _Layer()
    # Prefill: sequence b brings lengths[b] tokens (right-padded to 9).
    batch = cache.prepare(ids, lengths, "cpu")
    out, _ = paged_attention(layer, q[:, :, :9], k[:, :, :9], v[:, :, :9], None, scaling=0.3, switchkd_paged=batch)
    # Decode: every sequence brings 2 more tokens (taken from positions 9, 10 of the random tensors).
    batch = cache.prepare(ids, [2, 2, 2], "cpu")
    step, _ = paged_attention(layer, q[:, :, 9:], k[:, :, 9:], v[:, :, 9:], None, scaling=0.3, switchkd_paged=batch)
    for b, n in enumerate(lengths):
        keep = list(range(n)) + [9, 10]
        qb, kb, vb = q[b : b + 1, :, keep], k[b : b + 1, :, keep], v[b : b + 1, :, keep]
        ref = F.scaled_dot_product_attention(qb, kb, vb, is_causal=True, scale=0.3, enable_gqa=heads != kv_heads)
        ref = ref.transpose(1, 2)[0]
        torch.testing.assert_close(out[b, :n], ref[:n])
        torch.testing.assert_close(step[b], ref[n:])


def test_padding_never_enters_the_cache():
    cache = PagedKVCache(num_blocks=4, block_size=4)
    for i in (0, 1):
        cache.manager.add(i)
    k = torch.randn(2, 1, 3, 2)
    batch = cache.prepare([0, 1], [3, 1], "cpu")
    paged_attention(_Layer(), torch.randn(2, 1, 3, 2), k, k.clone(), None, switchkd_paged=batch)
    k_pool, _ = cache.layers[0]
    written = (k_pool.flatten(0, 1) != 0).any(-1).any(-1).sum().item()
    assert written == 4 and batch.lengths.tolist() == [3, 1]


def test_without_metadata_it_is_plain_sdpa():
    q, k, v = (torch.randn(2, 4, 5, 8) for _ in range(3))
    out, _ = paged_attention(_Layer(), q, k, v, None, scaling=None)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)
    torch.testing.assert_close(out, ref)
