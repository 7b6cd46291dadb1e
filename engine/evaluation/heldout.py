"""The held-out prompts of `eval.prompts`, read through the training data's loaders, with the optional
reference responses, cut into fixed batches that any number of processes share out alike."""
from __future__ import annotations

import dataclasses

from engine.config import TrainConfig
from engine.data import prompts


@dataclasses.dataclass(frozen=True)
class HeldOut:
    prompts: list[str]
    prompt_ids: list[list[int]]
    references: list[str] | None  # None: no reference column configured

    def __len__(self) -> int:
        return len(self.prompts)


def load(cfg: TrainConfig, tokenizer) -> HeldOut:
    """The usable prompts among the first `eval.max_prompts` rows of the split (and their references),
    filtered like training's (data.max_prompt_tokens, data.chat_template). An empty split, a
    missing prompt or reference column, or no usable prompt is a ValueError naming the eval key."""
    ev = cfg.eval
    data = dataclasses.replace(cfg.data, prompts=ev.prompts, split=ev.split,
                               prompt_column=ev.prompt_column or cfg.data.prompt_column,
                               partner_column=ev.reference_column, chosen_column=None, rejected_column=None)
    rows = prompts.load_rows(data, section="eval")
    if not len(rows):
        raise ValueError(f"eval.prompts {ev.prompts!r} (split {ev.split!r}) is empty")
    _check_columns(rows[0], data.prompt_column, ev.reference_column, ev.prompts)
    if ev.max_prompts:
        rows = rows[: ev.max_prompts]
    prepared = prompts.prepare(rows, tokenizer, data)
    references = prepared.partners if ev.reference_column else None
    return HeldOut(prompts=prepared.prompts, prompt_ids=prepared.prompt_ids, references=references)


def _check_columns(row, prompt_column: str, reference_column: str | None, source: str) -> None:
    """Before anything trains: the configured columns exist (checked on the first row)."""
    if not isinstance(row, dict):
        raise ValueError(f"eval.prompts {source!r}: rows must be objects, got {type(row).__name__}")
    for key, column in (("eval.prompt_column", prompt_column), ("eval.reference_column", reference_column)):
        if column is not None and column not in row:
            raise ValueError(f"{key} {column!r} is not a column of eval.prompts {source!r}; it has {sorted(row)}")


def batches(count: int, batch_size: int) -> list[range]:
    """Prompt indices cut into consecutive batches of `batch_size`: the same batches (and so the same
    sampling noise, seeded per batch) whatever the number of processes."""
    return [range(start, min(start + batch_size, count)) for start in range(0, count, batch_size)]


def shard(batch_list: list[range], rank: int, world: int) -> list[int]:
    """The batch numbers this rank evaluates (round robin)."""
    return list(range(rank, len(batch_list), world))
