"""Prompts: loading (built-in task, JSONL, a `datasets` directory, or a hub dataset), tokenization
with length filtering, and a resumable, seeded order over them."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch

from engine.config import DataConfig
from engine.tasks import BUILTIN_DATASETS

log = logging.getLogger(__name__)


def load_rows(cfg: DataConfig) -> list[dict]:
    """The raw rows of the prompt dataset, through the ecosystem's own loaders."""
    source = cfg.prompts
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN_DATASETS:
            raise ValueError(f"data.prompts: unknown built-in dataset {name!r}; known: {sorted(BUILTIN_DATASETS)}")
        return BUILTIN_DATASETS[name]()
    if source.endswith(".jsonl"):
        with open(source) as f:
            return [json.loads(line) for line in f if line.strip()]
    import datasets

    if os.path.isdir(source):
        loaded = datasets.load_from_disk(source)
        data = loaded[cfg.split] if isinstance(loaded, datasets.DatasetDict) else loaded
    else:
        data = datasets.load_dataset(source, split=cfg.split)
    return list(data)


@dataclasses.dataclass
class PromptSet:
    """Tokenized prompts that passed the filters, and the response texts read beside them: "partner"
    (hybrid REBEL's y'), "chosen" and "rejected" (offline preference pairs), when configured."""

    prompts: list[str]
    prompt_ids: list[list[int]]
    responses: dict[str, list[str]]
    skipped: int

    @property
    def partners(self) -> list[str] | None:
        return self.responses.get("partner")


def response_columns(cfg: DataConfig) -> dict[str, str]:
    """role -> dataset column of the configured response columns."""
    roles = {"partner": cfg.partner_column, "chosen": cfg.chosen_column, "rejected": cfg.rejected_column}
    return {role: column for role, column in roles.items() if column is not None}


def _prompt_text(row: dict, cfg: DataConfig, tokenizer) -> str:
    value = row[cfg.prompt_column]
    if isinstance(value, list):  # chat-format datasets: a list of {"role", "content"} messages
        messages = value
    elif isinstance(value, str) and value.strip():
        messages = [{"role": "user", "content": value}]
    else:
        raise ValueError(f"empty or non-text {cfg.prompt_column!r}: {value!r}")
    if cfg.chat_template:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if isinstance(value, list):
        return "\n".join(m["content"] for m in messages)
    return value


def _response_text(row: dict, column: str) -> str:
    """A response column: text, or a chat transcript whose last message is the assistant's answer
    (the layout of e.g. UltraFeedback's chosen / rejected columns)."""
    value = row[column]
    if isinstance(value, list) and value and isinstance(value[-1], dict):
        value = value[-1].get("content")
    if not isinstance(value, str):
        raise ValueError(f"non-text {column!r}: {value!r}")
    return value


def prepare(rows: list[dict], tokenizer, cfg: DataConfig) -> PromptSet:
    """Tokenize prompts; report and skip invalid rows and prompts over max_prompt_tokens."""
    columns = response_columns(cfg)
    prompts, ids, skipped = [], [], 0
    responses: dict[str, list[str]] = {role: [] for role in columns}
    for i, row in enumerate(rows):
        try:
            text = _prompt_text(row, cfg, tokenizer)
            texts = {role: _response_text(row, column) for role, column in columns.items()}
        except (KeyError, ValueError, TypeError) as err:
            log.warning("data row %d skipped: %s", i, err)
            skipped += 1
            continue
        tokens = tokenizer(text, add_special_tokens=not cfg.chat_template)["input_ids"]
        if not tokens or len(tokens) > cfg.max_prompt_tokens:
            skipped += 1
            continue
        prompts.append(text)
        ids.append(tokens)
        for role, value in texts.items():
            responses[role].append(value)
    if not prompts:
        raise ValueError(f"data.prompts {cfg.prompts!r}: no usable prompt ({skipped} rows skipped)")
    if skipped:
        log.warning("%d of %d prompt rows skipped (invalid or longer than %d tokens)", skipped, len(rows),
                    cfg.max_prompt_tokens)
    return PromptSet(prompts, ids, responses, skipped)


class PromptOrder:
    """A seeded permutation per epoch over the prompts; its position is part of every checkpoint."""

    def __init__(self, size: int, seed: int):
        self.size, self.seed = size, seed
        self.epoch, self.position = 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.size, generator=g).tolist()

    def take(self, count: int) -> list[int]:
        out = []
        while len(out) < count:
            if self.position == self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(self._perm[self.position])
            self.position += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "size": self.size}

    def load_state_dict(self, state: dict) -> None:
        if state["size"] != self.size or state["seed"] != self.seed:
            raise ValueError(f"checkpointed prompt order (size {state['size']}, seed {state['seed']}) does not match "
                             f"this run's (size {self.size}, seed {self.seed})")
        self.epoch, self.position = state["epoch"], state["position"]
        self._perm = self._permutation()


def left_pad(token_lists: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, P] left-padded ids and attention mask."""
    width = max(map(len, token_lists))
    ids = torch.full((len(token_lists), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_lists), width), dtype=torch.long)
    for i, toks in enumerate(token_lists):
        ids[i, width - len(toks):] = torch.tensor(toks, dtype=torch.long)
        mask[i, width - len(toks):] = 1
    return ids.to(device), mask.to(device)
