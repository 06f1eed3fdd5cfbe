"""Tiny random models built from configs, with a byte-level tokenizer: tests run in milliseconds.

``tiny_model("llama")`` returns ``(model, tokenizer)``; families: llama, qwen2, gemma3, gpt2,
gpt_neox. The tokenizer is byte-level (256 byte tokens + specials) with a ChatML chat template, so
chat formatting, padding and position logic are exercised exactly as with real models.
"""
from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, Gemma3TextConfig, GPT2Config, GPTNeoXConfig,
                          LlamaConfig, PreTrainedTokenizerFast, Qwen2Config)

from mechdiff.errors import ConfigError

FAMILIES = ("llama", "qwen2", "gemma3", "gpt2", "gpt_neox")
SPECIALS = ["<pad>", "<bos>", "<eos>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: ids 0..255 are bytes (as GPT-2 unicode chars), then the specials."""
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    order = [bytes_to_unicode()[b] for b in range(256)]
    assert set(order) == set(byte_chars)
    vocab = {c: i for i, c in enumerate(order)}
    for s in SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<|im_end|>", padding_side="left")
    fast.chat_template = CHATML
    return fast


def tiny_config(family: str, vocab_size: int, n_layers: int = 4, d_model: int = 64, n_heads: int = 4):
    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=257, eos_token_id=260)
    if family == "llama":
        return LlamaConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                           num_attention_heads=n_heads, num_key_value_heads=n_heads // 2, **common)
    if family == "qwen2":
        return Qwen2Config(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                           num_attention_heads=n_heads, num_key_value_heads=n_heads // 2, **common)
    if family == "gemma3":
        return Gemma3TextConfig(hidden_size=d_model, intermediate_size=2 * d_model,
                                num_hidden_layers=n_layers, num_attention_heads=n_heads,
                                num_key_value_heads=1, head_dim=d_model // n_heads,
                                sliding_window=8, **common)
    if family == "gpt2":
        return GPT2Config(n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=256, **common)
    if family == "gpt_neox":
        return GPTNeoXConfig(hidden_size=d_model, intermediate_size=2 * d_model, num_hidden_layers=n_layers,
                             num_attention_heads=n_heads, max_position_embeddings=256, **common)
    raise ConfigError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")


def tiny_model(family: str = "llama", seed: int = 0, n_layers: int = 4, d_model: int = 64,
               n_heads: int = 4, dtype: torch.dtype = torch.float32):
    """A randomly initialised causal LM of ``family`` (eval mode, float32) and its tokenizer."""
    tok = tiny_tokenizer()
    cfg = tiny_config(family, len(tok), n_layers, d_model, n_heads)
    cfg._attn_implementation = "eager" if family == "gemma3" else "sdpa"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    # Random init uses std 0.02: scale up so layers visibly change the residual in tests.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(4.0)
    return model, tok
