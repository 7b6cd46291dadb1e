"""Tiny random Hugging Face causal LMs of each family the engine supports, built from configs."""
import torch
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoXConfig,
    GPTNeoXForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 97
EOS_IDS = [3, 5]  # a multi-EOS model, like Llama-3-Instruct's <|eot_id|> and <|end_of_text|>
PAD = 0


def tiny_model(family: str, seed: int = 0, eos=EOS_IDS):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, eos_token_id=list(eos), pad_token_id=PAD, bos_token_id=1)
    if family == "llama":
        cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, **common)
        model = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, max_position_embeddings=128, **common)
        model = Qwen2ForCausalLM(cfg)
    elif family == "gpt_neox":
        cfg = GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=128, rotary_pct=0.25, **common)
        model = GPTNeoXForCausalLM(cfg)
    elif family == "gpt2":
        cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=128, **common)
        model = GPT2LMHeadModel(cfg)
    else:
        raise ValueError(family)
    model.generation_config.eos_token_id = list(eos)
    model.generation_config.pad_token_id = PAD
    return model.eval()


FAMILIES = ["llama", "qwen2", "gpt_neox", "gpt2"]


def left_pad(prompts, pad=PAD):
    """Left-padded [B, P] ids and mask from lists of token ids."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask
