"""Decode section of the throughput benchmark: SWITCH generation, tokens per second.

Providers: ``hf_loop`` (the loop a user would write: both models stepped with ``DynamicCache``,
JSD and sampling in PyTorch); ``switchkd`` eager steps: stepwise (draft_len 1), drafts of 2/4/8 and
adaptive (up to 8); ``switchkd_graph``: the static-shape path, adaptive up to 8, its steps replayed
from CUDA graphs (on CPU the same static-shape steps run without capture). Random-weight model
pairs; the threshold tau0 is calibrated on the pair (a quantile of the JSDs of a student-only run)
so that about 50% (the paper's regime) or, on CPU, also 20% of the tokens switch.
"""

from __future__ import annotations

import time

import torch
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import switchkd

PAIRS = {
    # name: (teacher config kwargs, student config kwargs, family)
    "gpt2-tiny": ({"n_layer": 6, "n_embd": 384, "n_head": 6}, {"n_layer": 2, "n_embd": 128, "n_head": 2}, "gpt2"),
    "gpt2-large/small": ({"n_layer": 36, "n_embd": 1280, "n_head": 20}, {"n_layer": 12, "n_embd": 768, "n_head": 12},
                         "gpt2"),
    "llama-1b/160m": ({"num_hidden_layers": 16, "hidden_size": 2048, "intermediate_size": 8192,
                       "num_attention_heads": 32, "num_key_value_heads": 8},
                      {"num_hidden_layers": 12, "hidden_size": 768, "intermediate_size": 3072,
                       "num_attention_heads": 12, "num_key_value_heads": 4}, "llama"),
}


def build(kwargs, family, vocab, dtype, device):
    if family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=1024, bos_token_id=None, eos_token_id=None,
                                           **kwargs))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, max_position_embeddings=2048, **kwargs))
    return model.to(device=device, dtype=dtype).eval()


@torch.no_grad()
def hf_loop(teacher, student, prompts, max_new_tokens, policy, temperature, seed):
    """The plain SWITCH loop: two DynamicCaches, softmax/JSD/multinomial in PyTorch."""
    generator = torch.Generator(device=prompts.device).manual_seed(seed)
    caches = DynamicCache(), DynamicCache()
    t_logits = teacher(prompts, past_key_values=caches[0], use_cache=True).logits[:, -1]
    s_logits = student(prompts, past_key_values=caches[1], use_cache=True).logits[:, -1]
    switched = 0
    for t in range(max_new_tokens):
        p_s = torch.softmax(s_logits.float() / temperature, -1)
        p_t = torch.softmax(t_logits.float() / temperature, -1)
        m = 0.5 * (p_s + p_t)
        jsd = 0.5 * (torch.special.xlogy(p_t, p_t / m) + torch.special.xlogy(p_s, p_s / m)).sum(-1)
        s_tok = torch.multinomial(p_s, 1, generator=generator)
        t_tok = torch.multinomial(p_t, 1, generator=generator)
        switch = jsd > policy.threshold(t)
        token = torch.where(switch[:, None], t_tok, s_tok)
        switched += int(switch.sum())
        t_logits = teacher(token, past_key_values=caches[0], use_cache=True).logits[:, -1]
        s_logits = student(token, past_key_values=caches[1], use_cache=True).logits[:, -1]
    return switched / (max_new_tokens * prompts.shape[0])


def calibrated_policy(teacher, student, prompts, max_new_tokens, share=0.5, decay=0.01):
    """An ``exp`` policy whose threshold the student-only run's divergences cross about ``share`` of the time."""
    calib = switchkd.switch_generate(teacher, student, prompts, policy=switchkd.SwitchPolicy("never"),
                                     max_new_tokens=max_new_tokens)
    scaled = calib.divergence * torch.exp(decay * torch.arange(max_new_tokens))
    scaled = scaled[~scaled.isnan()].double()
    return switchkd.SwitchPolicy("exp", tau0=float(scaled.quantile(1.0 - share)), decay=decay)


def timed(device, fn, *args, **kwargs):
    """(seconds, result) of ``fn(*args, **kwargs)``."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def bookkeeping_row(batch=64, context=512, steps=500):
    """Host time of one decoding step's block bookkeeping for both models at ``batch`` sequences:
    the forward metadata (``prepare``) and the rollback (``truncate``) of each cache."""
    from switchkd.decoding.kvcache import PagedKVCache

    caches = [PagedKVCache(batch * (context // 16 + 2), 16) for _ in range(2)]
    ids = list(range(batch))
    for cache in caches:
        for i in ids:
            cache.manager.add(i)
        cache.manager.prepare(ids, [context] * batch)
    start = time.perf_counter()
    for _ in range(steps):
        for cache in caches:
            cache.prepare(ids, [1] * batch, "cpu")
            cache.manager.truncate(ids, [context] * batch)
    us = 1e6 * (time.perf_counter() - start) / steps
    return {"section": "decode", "op": "block_bookkeeping", "provider": "switchkd", "shape": f"b{batch} ctx{context}",
            "dtype": "-", "mode": "host", "bookkeeping_us_per_step": us}


def run_decode(device, dtype, pair_names, batches, prompt_len, max_new_tokens, vocab, shares=(0.5, 0.2)):
    rows = [bookkeeping_row()]
    for name in pair_names:
        teacher_kwargs, student_kwargs, family = PAIRS[name]
        torch.manual_seed(0)
        teacher = build(teacher_kwargs, family, vocab, dtype, device)
        student = build(student_kwargs, family, vocab, dtype, device)
        for batch, share in [(b, share) for b in batches for share in shares]:
            prompts = torch.randint(0, vocab, (batch, prompt_len), device=device)
            policy = calibrated_policy(teacher, student, prompts, max_new_tokens, share=share)
            tau0 = policy.tau0
            generator = switchkd.SwitchGenerator(teacher, student, block_size=16, cuda_graphs=False)
            generator.generate(prompts, policy=policy, max_new_tokens=4)  # warm-up, sizes the pools
            tokens = batch * max_new_tokens
            base = {"section": "decode", "op": "switch_generate", "shape": f"{name} b{batch} p{prompt_len} "
                    f"n{max_new_tokens}", "dtype": str(dtype).replace("torch.", ""), "mode": f"tau0={tau0:.3f}"}
            seconds, share = timed(device, hf_loop, teacher, student, prompts, max_new_tokens, policy, 1.0, 0)
            eager_tps = tokens / seconds
            rows.append({**base, "provider": "hf_loop", "ms": 1e3 * seconds, "tokens_per_s": eager_tps,
                         "teacher_share": share, "speedup_vs_eager": 1.0})
            graphs = switchkd.SwitchGenerator(teacher, student, block_size=16, cuda_graphs=True)
            request = {"policy": policy, "max_new_tokens": max_new_tokens, "draft_len": 8, "adaptive_draft": True}
            graphs.generate(prompts, **(request if device == "cuda" else {**request, "max_new_tokens": 4}))  # capture
            for label, gen, draft_len, adaptive in [("switchkd_k1", generator, 1, False),
                                                    ("switchkd_k2", generator, 2, False),
                                                    ("switchkd_k4", generator, 4, False),
                                                    ("switchkd_k8", generator, 8, False),
                                                    ("switchkd_adaptive8", generator, 8, True),
                                                    ("switchkd_graph", graphs, 8, True)]:
                seconds, out = timed(device, gen.generate, prompts, policy=policy, max_new_tokens=max_new_tokens,
                                     draft_len=draft_len, adaptive_draft=adaptive)
                forwards = out.student_forwards + out.teacher_forwards
                rows.append({**base, "provider": label, "ms": 1e3 * seconds, "tokens_per_s": tokens / seconds,
                             "teacher_share": out.teacher_share, "speedup_vs_eager": tokens / seconds / eager_tps,
                             "teacher_forwards": out.teacher_forwards, "student_forwards": out.student_forwards,
                             "bookkeeping_us_per_forward": 1e6 * out.bookkeeping_seconds / forwards})
    return rows


# Decode: (model pairs, batches, prompt length, new tokens, vocabulary, switched shares). On a GPU the issue's
# Llama pair at about half the tokens switched: ~40 s per batch (the plain HF loop alone ~13 s on the H200),
# so batch 1, 16 and 64 fit its 3 minutes; the GPT-2 pair and the 20% share would each double that.
GPU_DECODE = (["llama-1b/160m"], [1, 16, 64], 64, 128, 32000, (0.5,))
CPU_DECODE = (["gpt2-tiny"], [8], 16, 96, 8192, (0.5, 0.2))


def run(section, ctx):
    return run_decode(ctx.device, ctx.dtype, *(GPU_DECODE if ctx.full else CPU_DECODE))
