"""Tiny random causal LMs of several families, built from configs: no downloads."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

VOCAB = 320

CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=3, n_head=4, n_positions=512),
    "gpt_neox": dict(model_type="gpt_neox", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                     num_attention_heads=4, max_position_embeddings=512),
    "phi3": dict(model_type="phi3", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                 num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                 pad_token_id=0),
    "opt": dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=3, num_attention_heads=4,
                max_position_embeddings=512, word_embed_proj_dim=32),
    "gemma": dict(model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512),
}

# State-space and hybrid families, kept apart from CONFIGS so the tests parametrized over every
# dense family do not run on them; tests/test_state_space.py covers them. The mixers run their
# slow torch path on the CPU (no mamba-ssm kernels).
SSM_CONFIGS = {
    "mamba": dict(model_type="mamba", hidden_size=32, state_size=4, num_hidden_layers=3, expand=2,
                  conv_kernel=4, time_step_rank=4, use_mambapy=False),
    "mamba2": dict(model_type="mamba2", hidden_size=32, state_size=4, num_hidden_layers=3, expand=2,
                   num_heads=8, head_dim=8, n_groups=2, conv_kernel=4, time_step_rank=4, chunk_size=16),
    "falcon_mamba": dict(model_type="falcon_mamba", hidden_size=32, state_size=4, num_hidden_layers=3,
                         expand=2, conv_kernel=4, time_step_rank=4, use_mambapy=False),
    # A hybrid: Mamba2 mixers in blocks 0 and 2, attention in 1 and 3, an MLP in every block.
    "bamba": dict(model_type="bamba", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1, 3],
                  mamba_n_heads=8, mamba_d_head=8, mamba_n_groups=2, mamba_d_state=4, mamba_d_conv=4,
                  mamba_expand=2, mamba_chunk_size=16, max_position_embeddings=512, pad_token_id=0),
    # A hybrid of two layer classes in one list: Mamba layers 0 and 2, attention 1 and 3; one expert,
    # so its feed-forward is a plain MLP.
    "jamba": dict(model_type="jamba", hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                  expert_layer_period=2, expert_layer_offset=1, num_experts=1, num_experts_per_tok=1,
                  mamba_d_state=4, mamba_d_conv=4, mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False,
                  max_position_embeddings=512, pad_token_id=0),
}


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is a token."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_model(family: str, seed: int = 0):
    config = AutoConfig.for_model(**CONFIGS_ALL[family], vocab_size=VOCAB, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init is nearly uniform; widen the weights so probes see real divergences.
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0, 0.2)
    return model.eval()


def save_model(family: str, folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model = make_model(family, seed)
    model.save_pretrained(folder, safe_serialization=True)
    byte_tokenizer().save_pretrained(folder)
    return folder


# Mixtures of experts, kept apart from CONFIGS (the tests parametrized over every dense family):
# 4 experts, 2 per token, hidden 32, tiny expert MLPs.
MOE_CONFIGS = {
    "mixtral": dict(model_type="mixtral", hidden_size=32, intermediate_size=24, num_hidden_layers=3,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                    num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(model_type="qwen2_moe", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                      shared_expert_intermediate_size=32, decoder_sparse_step=1),
    "qwen3_moe": dict(model_type="qwen3_moe", hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                      num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, decoder_sparse_step=1),
    "olmoe": dict(model_type="olmoe", hidden_size=32, intermediate_size=24, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                  num_experts=4, num_experts_per_tok=2),
}
CONFIGS_ALL = {**CONFIGS, **MOE_CONFIGS, **SSM_CONFIGS}
