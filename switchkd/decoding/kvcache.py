"""Paged KV caches and the ``switchkd_paged`` attention function for Hugging Face models.

One :class:`PagedKVCache` per model: a C++ ``BlockManager`` for the block tables and, per layer, two
plain tensors ``[num_blocks + 1, block_size, H_kv, D]`` (allocated on the layer's first call, in the
model's dtype and device; the extra block is scratch for padding rows). A forward pass carries a
:class:`PagedBatch` as the extra keyword ``switchkd_paged``; the attention function writes the new
keys/values through its slot mapping and attends over each sequence's blocks. Without that keyword
it is plain SDPA, so a model can keep the implementation for training.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .. import _C

ATTENTION_NAME = "switchkd_paged"
# The generator's attention implementation: the same function with no mask function registered, so Hugging Face
# builds no mask (the paged path makes its own) and skips its packed-sequence check of ``position_ids``, a host
# sync per forward that would also put dead mask kernels into every captured step.
DECODE_IMPLEMENTATION = "switchkd_paged_decode"


class PagedKVCache:
    """KV blocks of one model: a ``switchkd._C.BlockManager`` plus per-layer K/V pools.

    The pools hold one block more than the manager hands out: block ``scratch_block`` takes the
    writes of padding rows in the static-shape path and pads block tables.
    """

    def __init__(self, num_blocks: int, block_size: int):
        self.manager = _C.BlockManager(num_blocks, block_size)
        self.block_size = block_size
        self.layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def num_blocks(self) -> int:
        return self.manager.num_blocks

    @property
    def scratch_block(self) -> int:
        return self.manager.num_blocks

    def pools(self, layer_idx: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V pools of a layer, created on first use with ``like``'s heads, head dim, dtype, device."""
        if layer_idx not in self.layers:
            shape = (self.num_blocks + 1, self.block_size, like.shape[1], like.shape[-1])
            self.layers[layer_idx] = (like.new_zeros(shape), like.new_zeros(shape))
        return self.layers[layer_idx]

    def prepare(self, ids: list[int], counts: list[int], device) -> PagedBatch:
        """Append ``counts[i]`` tokens to sequence ``ids[i]`` and describe the forward that writes them.

        The forward's inputs are right-padded to ``max(counts)`` tokens per sequence; padded tokens are
        never written to the cache. All metadata comes from one C++ call.
        """
        slots, rows, positions, table, lengths = (
            torch.from_numpy(a) for a in self.manager.prepare(ids, counts, pad_block=self.scratch_block))
        uniform = min(counts) == max(counts)
        return PagedBatch(
            cache=self,
            write_slots=slots.to(device, non_blocking=True),
            write_rows=None if uniform else rows.to(device, non_blocking=True),
            positions=positions.to(device, non_blocking=True),
            block_table=table.to(device, non_blocking=True),
            lengths=lengths.to(device=device, dtype=torch.int32, non_blocking=True),
        )


def causal_mask(positions: torch.Tensor, num_keys: int) -> torch.Tensor:
    """``[B, 1, q, num_keys]`` bool, True where key ``j`` may be read by the query at ``positions[b, i]``
    (``j <= position``: bottom-right causal over the sequence's own blocks). No host sync."""
    keys = torch.arange(num_keys, device=positions.device)
    return keys <= positions[:, None, :, None]


@dataclass
class PagedBatch:
    """Per-forward metadata shared by all layers (extra forward keyword ``switchkd_paged``).

    Every field is a tensor of a shape fixed by the forward's inputs, so a static-shape step reads
    them from preallocated buffers and the attention function can be captured in a CUDA graph.
    """

    cache: PagedKVCache
    write_slots: torch.Tensor  # [n] int64 pool slots of the written new tokens
    write_rows: torch.Tensor | None  # [n] int64 their rows in the flattened [B * q] inputs; None = all rows
    positions: torch.Tensor  # [B, q] int64 position ids (pads repeat the last real position)
    block_table: torch.Tensor  # [B, max_blocks] int64 block ids (padding: the scratch block, masked out)
    lengths: torch.Tensor  # [B] int32 cached tokens per sequence, new ones included
    mask: torch.Tensor | None = None  # [B, 1, q, max_blocks * block_size] bool, True = attend

    def __post_init__(self):
        if self.mask is None:
            self.mask = causal_mask(self.positions, self.block_table.shape[1] * self.cache.block_size)

    @property
    def uniform(self) -> bool:
        """Every sequence adds the same number of tokens (no padded queries)."""
        return self.write_rows is None


def paged_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """AttentionInterface function: query ``[B, H, q, D]``, key/value ``[B, H_kv, q, D]`` (new tokens).

    Writes the new keys/values into the pools, gathers each sequence's blocks and runs SDPA with a
    bottom-right-aligned causal mask (GQA through ``enable_gqa``). Returns ``[B, q, H, D]``. Its control
    flow depends only on shapes, dtypes and devices, never on tensor values, so it can be captured in a
    CUDA graph.
    """
    batch: PagedBatch | None = kwargs.pop(ATTENTION_NAME, None)
    if batch is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    k_pool, v_pool = batch.cache.pools(module.layer_idx, key)
    num_heads, head_dim = key.shape[1], key.shape[-1]
    for pool, new in ((k_pool, key), (v_pool, value)):
        flat_new = new.transpose(1, 2).reshape(-1, num_heads, head_dim)
        if batch.write_rows is not None:
            flat_new = flat_new.index_select(0, batch.write_rows)
        pool.view(-1, num_heads, head_dim).index_copy_(0, batch.write_slots, flat_new)
    if _use_flash_attn(query, batch):
        from flash_attn import flash_attn_with_kvcache

        table = batch.block_table.to(torch.int32)
        out = flash_attn_with_kvcache(query.transpose(1, 2), k_pool, v_pool, cache_seqlens=batch.lengths,
                                      block_table=table, softmax_scale=scaling, causal=True)
        return out, None
    bsz = query.shape[0]
    keys = k_pool[batch.block_table].view(bsz, -1, num_heads, head_dim).transpose(1, 2)
    values = v_pool[batch.block_table].view(bsz, -1, num_heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        query, keys, values, attn_mask=batch.mask, scale=scaling, enable_gqa=query.shape[1] != num_heads,
    )
    return out.transpose(1, 2).contiguous(), None


def _use_flash_attn(query, batch: PagedBatch) -> bool:
    """flash-attn's paged kernel: CUDA, fp16/bf16, blocks of a multiple of 256, no padded queries."""
    return (query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and batch.uniform
            and batch.cache.block_size % 256 == 0 and _has_flash_attn())


@functools.cache
def _has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


AttentionInterface.register(ATTENTION_NAME, paged_attention)
AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)  # without a PagedBatch: SDPA with Hugging Face's masks
AttentionInterface.register(DECODE_IMPLEMENTATION, paged_attention)
