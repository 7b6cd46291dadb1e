"""The built-in task of the embedded default: counting, with a character-level tokenizer and a tiny
random Llama, all built locally (no hub access).

The prompt is a run of consecutive digits ("3456"); the objective a person would state is:
"continue the count for four more digits, then stop" ("7890" then EOS). The reward gives partial
credit per correct leading digit and charges extra characters, so a random policy scores low and
REBEL has a gradient from the first iteration.
"""
from __future__ import annotations

import random

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>"]
CHARS = list("0123456789 :")
TARGET_DIGITS = 4


def char_tokenizer(vocab_size: int | None = None) -> PreTrainedTokenizerFast:
    """A character-level fast tokenizer over digits, space and colon; `vocab_size` pads the vocabulary
    with filler tokens "<fill{i}>" to match a real model's head (benchmarks with random weights)."""
    tokens = SPECIALS + CHARS
    if vocab_size is not None:
        tokens += [f"<fill{i}>" for i in range(vocab_size - len(tokens))]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>",
                                   padding_side="left")


def _special_tokens(tokenizer) -> dict:
    """The config fields every built-in model takes from its tokenizer (and an untied head)."""
    return dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)


def tiny_llama(tokenizer, *, seed: int = 0, dtype=torch.float32) -> LlamaForCausalLM:
    """A 2-layer, 64-wide Llama with random weights, sized for the character vocabulary."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      **_special_tokens(tokenizer))
    model = LlamaForCausalLM(cfg).to(dtype)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def random_pythia_1b4(tokenizer, *, seed: int = 0) -> GPTNeoXForCausalLM:
    """Pythia-1.4B's architecture (24 layers, 2048 wide, vocab 50304) with random weights."""
    torch.manual_seed(seed)
    cfg = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                        num_attention_heads=16, rotary_pct=0.25, max_position_embeddings=2048,
                        **_special_tokens(tokenizer))
    return GPTNeoXForCausalLM(cfg)


def random_llama_32k(tokenizer, *, seed: int = 0) -> LlamaForCausalLM:
    """A small Llama (4 layers, 256 wide, 4 heads, MLP 688) with a 32000-token head and random weights:
    the prompt-heavy iteration benchmark's model (bench/prompt_heavy.py)."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
                      **_special_tokens(tokenizer))
    return LlamaForCausalLM(cfg)


BUILTIN_MODELS = {  # name -> (tokenizer factory, model factory)
    "tiny-llama": (char_tokenizer, tiny_llama),
    "pythia-1.4b-random": (lambda: char_tokenizer(50304), random_pythia_1b4),
    "llama-32k-random": (lambda: char_tokenizer(32000), random_llama_32k),
}


def counting_prompts(n: int = 2000, seed: int = 1234, lengths: tuple[int, int] = (2, 5)) -> list[dict]:
    """Rows {"prompt": "3456"}: `lengths` (2 to 5 by default) consecutive digits (mod 10) from a random start."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        start, length = rng.randrange(10), rng.randint(*lengths)
        rows.append({"prompt": "".join(str((start + k) % 10) for k in range(length))})
    return rows


def counting_long_prompts(n: int = 2000, seed: int = 1234) -> list[dict]:
    """The counting task with long prompts, 64 to 256 digits (uniform, fixed seed), for benchmarks where
    the prompt dominates a pair's positions."""
    return counting_prompts(n, seed, lengths=(64, 256))


def counting_eval(n: int = 200, seed: int = 98765) -> list[dict]:
    """The counting task's held-out split: rows {"prompt", "reference"}. Prompts of 2 to 7 digits from
    another seed (training draws 2 to 5, so lengths 6 and 7 were never trained on; the shorter ones are
    the same 40 possible prompts), each with a terse human's reference answer: the first 1 to 4 digits
    of the count (uniform), scoring 1/4 to 1 under `counting_reward`."""
    rng = random.Random(seed + 1)
    rows = []
    for row in counting_prompts(n, seed, lengths=(2, 7)):
        last = int(row["prompt"][-1])
        digits = rng.randint(1, TARGET_DIGITS)
        rows.append({"prompt": row["prompt"], "reference": "".join(str((last + 1 + k) % 10) for k in range(digits))})
    return rows


def counting_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """Score in [-1, 1]: +1/4 per leading digit that continues the count, -1/4 per other character or
    per character beyond four; an empty response scores -1/2 (saying nothing is worse than a wrong guess)."""
    scores = []
    for prompt, response in zip(prompts, responses):
        last = int(prompt.strip()[-1])
        want = "".join(str((last + 1 + k) % 10) for k in range(TARGET_DIGITS))
        correct = 0
        for got, expected in zip(response, want):
            if got != expected:
                break
            correct += 1
        if not response:
            scores.append(-0.5)
            continue
        wrong = len(response) - correct
        scores.append(max(-1.0, (correct - wrong) / TARGET_DIGITS))
    return scores


def _candidate(prompt: str, rng: random.Random) -> str:
    """A response of an imperfect writer: 0 to 6 characters, each the next digit of the count with
    probability 1/2 (else a random digit)."""
    nxt, out = int(prompt[-1]), []
    for _ in range(rng.randint(0, 6)):
        nxt = (nxt + 1) % 10
        out.append(str(nxt) if rng.random() < 0.5 else str(rng.randrange(10)))
    return "".join(out)


def counting_preference_pairs(n: int = 2000, seed: int = 4321) -> list[dict]:
    """An offline preference dataset for the counting task: rows {"prompt", "chosen", "rejected"}, two
    candidate responses per prompt labelled by `counting_reward` (ties redrawn), like a human-labelled
    dataset of an earlier model's outputs. Offline DPO trains on it."""
    rng = random.Random(seed)
    rows = []
    for row in counting_prompts(n, seed):
        prompt = row["prompt"]
        while True:
            a, b = _candidate(prompt, rng), _candidate(prompt, rng)
            ra, rb = counting_reward([prompt, prompt], [a, b])
            if ra != rb:
                break
        rows.append({"prompt": prompt, "chosen": a if ra > rb else b, "rejected": b if ra > rb else a})
    return rows


def counting_preference(prompts: list[str], responses: list[str], others: list[str]) -> torch.Tensor:
    """A preference model for the counting task: Bradley-Terry on `counting_reward`,
    P(y > y' | x) = sigmoid(4 (r(y) - r(y'))): one more correct digit (+1/4) is preferred 73% of the time."""
    r = torch.tensor(counting_reward(prompts, responses), dtype=torch.float32)
    r_other = torch.tensor(counting_reward(prompts, others), dtype=torch.float32)
    return torch.sigmoid(4 * (r - r_other))


BUILTIN_DATASETS = {"counting": counting_prompts, "counting_preferences": counting_preference_pairs,
                    "counting_long": counting_long_prompts, "counting_eval": counting_eval}
BUILTIN_REWARDS = {"counting": counting_reward, "counting_preferences": counting_reward,  # by dataset name
                   "counting_long": counting_reward}
BUILTIN_PREFERENCES = {"counting": counting_preference, "counting_preferences": counting_preference,
                       "counting_long": counting_preference}
