"""Prompts: loading (built-in task, JSONL / JSON, a `datasets` directory, or a hub dataset), tokenization
with length filtering, and a resumable, seeded order over them."""
from __future__ import annotations

import dataclasses
import json
import logging
import os

import torch

from engine.config import DataConfig
from engine.data.tasks import BUILTIN_DATASETS

log = logging.getLogger(__name__)


ACCEPTED_SOURCES = ("builtin:NAME (" + ", ".join(sorted(BUILTIN_DATASETS)) + ")",
                    "a *.jsonl file (one JSON object a line)",
                    "a *.json file (a list of objects, or JSON lines)",
                    "a directory written by datasets' save_to_disk",
                    "a Hugging Face hub dataset id (org/name)")


class Rows(list):
    """The raw rows of a dataset, and where each came from (`where[i]`: "file:line", for messages)."""

    def __init__(self, rows=(), where: list[str] | None = None):
        super().__init__(rows)
        self.where = where


def _unknown_source(source: str, why: str, section: str = "data") -> ValueError:
    accepted = "\n  ".join(ACCEPTED_SOURCES)
    return ValueError(f"{section}.prompts {source!r}: {why}; accepted sources:\n  {accepted}")


def load_rows(cfg: DataConfig, section: str = "data") -> list[dict]:
    """The raw rows of the prompt dataset, through the ecosystem's own loaders. A line of a JSON-lines
    file that is not UTF-8 or not JSON is skipped with a warning naming the file and the line. Errors name
    the config keys as `section`.prompts / `section`.split (the held-out set reads through here too)."""
    source = cfg.prompts
    if source.startswith("builtin:"):
        name = source.split(":", 1)[1]
        if name not in BUILTIN_DATASETS:
            raise ValueError(f"{section}.prompts: unknown built-in dataset {name!r}; known: {sorted(BUILTIN_DATASETS)}")
        return BUILTIN_DATASETS[name]()
    local = os.path.exists(source) or source.startswith(("/", "./", "../", "~")) or source.endswith((".jsonl", ".json"))
    if source.endswith((".jsonl", ".json")) and os.path.isfile(source):
        return _read_json_rows(source)
    if local and not os.path.isdir(source):
        why = "no such file or directory" if not os.path.exists(source) else "not a file type the engine reads"
        raise _unknown_source(source, why, section)
    import datasets

    if os.path.isdir(source):
        try:
            loaded = datasets.load_from_disk(source)
        except FileNotFoundError as err:
            raise _unknown_source(source, f"a directory, but not one written by save_to_disk ({err})",
                                  section) from None
        if isinstance(loaded, datasets.DatasetDict):
            if cfg.split not in loaded:
                raise ValueError(f"{section}.prompts {source!r} has no split {cfg.split!r} ({section}.split); it has "
                                 f"{sorted(loaded)}")
            loaded = loaded[cfg.split]
        return list(loaded)
    try:
        data = datasets.load_dataset(source, split=cfg.split)
    except Exception as err:  # the hub's many errors (not found, offline, bad split): one message that names it
        raise _unknown_source(source, f"could not load it as a hub dataset ({type(err).__name__}: {err})",
                              section) from err
    return list(data)


def _read_json_rows(path: str) -> Rows:
    """A *.json file (one JSON list of objects) or JSON lines (*.jsonl, or *.json holding lines)."""
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".json"):
        try:
            whole = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            whole = None  # not one JSON document: read as JSON lines below
        else:
            if isinstance(whole, list):
                return Rows(whole, [f"{path} item {i + 1}" for i in range(len(whole))])
            if not isinstance(whole, dict):
                raise ValueError(f"{path}: expected a list of objects or JSON lines, got a JSON "
                                 f"{type(whole).__name__}")
            return Rows([whole], [f"{path}:1"])
    rows, where, bad = Rows(), [], 0
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            log.warning("%s:%d: skipped: not UTF-8 (byte 0x%02x at column %d)", path, lineno, line[err.start],
                        err.start + 1)
            bad += 1
            continue
        try:
            rows.append(json.loads(text))
        except json.JSONDecodeError as err:
            log.warning("%s:%d: skipped: not valid JSON (%s at column %d)", path, lineno, err.msg, err.colno)
            bad += 1
            continue
        where.append(f"{path}:{lineno}")
    if bad:
        log.warning("%s: %d unreadable line(s) skipped", path, bad)
    rows.where = where
    return rows


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
            where = rows.where[i] if getattr(rows, "where", None) else f"row {i + 1}"
            detail = f"no column {err}" if isinstance(err, KeyError) else str(err)
            if not isinstance(row, dict):
                detail = f"expected a JSON object, got {type(row).__name__}"
            log.warning("data %s skipped: %s", where, detail)
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
        raise ValueError(f"data.prompts {cfg.prompts!r}: no usable prompt ({skipped} of {len(rows)} rows skipped; "
                         f"see the warnings above)")
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
