"""Tiny random-weight Hugging Face models for the decoding tests (no downloads)."""

import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97
CONTEXT = 96


def tiny_model(family: str, width: int = 32, layers: int = 2, seed: int = 0, dtype=torch.float64):
    """A small causal LM of `family`; `initializer_range` is large so that teacher and student disagree."""
    torch.manual_seed(seed)
    common = {"vocab_size": VOCAB, "initializer_range": 0.3, "bos_token_id": None, "eos_token_id": None}
    if family == "gpt2":
        config = GPT2Config(n_positions=CONTEXT, n_embd=width, n_layer=layers, n_head=4, **common)
        model = GPT2LMHeadModel(config)
    elif family == "opt":
        config = OPTConfig(hidden_size=width, num_hidden_layers=layers, ffn_dim=2 * width, num_attention_heads=4,
                           max_position_embeddings=CONTEXT, word_embed_proj_dim=width, **common)
        model = OPTForCausalLM(config)
    else:
        cls_config, cls_model = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
            family]
        config = cls_config(hidden_size=width, intermediate_size=2 * width, num_hidden_layers=layers,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=CONTEXT, **common)
        model = cls_model(config)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.config, key, None)
    return model.to(dtype).eval()


def pair(family: str, dtype=torch.float64):
    """(teacher, student) of one family sharing the vocabulary."""
    return tiny_model(family, width=64, layers=3, seed=1, dtype=dtype), tiny_model(family, seed=2, dtype=dtype)


def char_tokenizer():
    """The character-level tokenizer of benchmarks/tasks.py (<pad> = 0, <eos> = 1)."""
    from tasks import build_tokenizer

    return build_tokenizer("char")


def char_gpt2(layers: int, width: int, seed: int, vocab: int = 103):
    """A dropout-free GPT-2 over the character vocabulary, float32."""
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=128, n_embd=width, n_layer=layers, n_head=2, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=1, pad_token_id=0)
    return GPT2LMHeadModel(config)


REVERSE_ROWS = [{"prompt": f"reverse {w}:", "response": w[::-1]} for w in
                ["abc", "hello", "kd", "switch", "teacher", "xyz", "model", "token"]]
