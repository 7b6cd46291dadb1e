"""Reward functions: a Hugging Face sequence-classification reward model (with its own tokenizer and
chat template), or a Python function given by import path. Both map (prompts, responses) -> scores."""
from __future__ import annotations

import importlib
from typing import Callable, Protocol

import torch

from engine.config import RewardConfig
from engine.tasks import BUILTIN_REWARDS


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float] | torch.Tensor: ...


def import_function(path: str) -> Callable:
    """'package.module:function' (or builtin:NAME for the built-in tasks) -> the callable."""
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name not in BUILTIN_REWARDS:
            raise ValueError(f"reward.function: unknown built-in reward {name!r}; known: {sorted(BUILTIN_REWARDS)}")
        return BUILTIN_REWARDS[name]
    module, sep, attr = path.partition(":")
    if not sep or not attr:
        raise ValueError(f"reward.function must look like 'package.module:function', got {path!r}")
    fn = getattr(importlib.import_module(module), attr, None)
    if not callable(fn):
        raise ValueError(f"reward.function {path!r} is not a callable")
    return fn


class RewardModel:
    """Scores with a sequence-classification model. The response text is re-encoded with the reward
    model's own tokenizer (and chat template, when it has one), never fed as policy token ids."""

    def __init__(self, path: str, *, device, batch_size: int, dtype=None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer  # noqa: PLC0415

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size = device, batch_size

    def _format(self, prompt: str, response: str) -> str:
        if self.tokenizer.chat_template:
            chat = [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]
            return self.tokenizer.apply_chat_template(chat, tokenize=False)
        return prompt + response

    @torch.no_grad()
    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        scores = []
        for i in range(0, len(prompts), self.batch_size):
            texts = [self._format(p, r) for p, r in zip(prompts[i : i + self.batch_size],
                                                        responses[i : i + self.batch_size])]
            enc = self.tokenizer(texts, return_tensors="pt", padding=True, truncation=True,
                                 add_special_tokens=not self.tokenizer.chat_template).to(self.device)
            scores.append(self.model(**enc).logits[:, 0].float())
        return torch.cat(scores)


def build_reward(cfg: RewardConfig, *, default: str | None, device, dtype=None) -> RewardFn:
    if cfg.model:
        return RewardModel(cfg.model, device=device, batch_size=cfg.batch_size, dtype=dtype)
    if cfg.function:
        return import_function(cfg.function)
    if default:
        return import_function(default)
    raise ValueError("no reward: set reward.model or reward.function")


def score(reward: RewardFn, prompts: list[str], responses: list[str], device) -> torch.Tensor:
    """Call the reward and return float32 scores on device; a wrong count is an error."""
    out = reward(prompts, responses)
    out = torch.as_tensor(out, dtype=torch.float32).to(device).reshape(-1)
    if out.numel() != len(prompts):
        raise ValueError(f"the reward returned {out.numel()} scores for {len(prompts)} responses")
    return out
