"""Optional experiment trackers: Weights & Biases (`--logging.wandb true`) mirrors what the run writes
to disk: the metrics rows, the evaluation rows (prefix eval/) and the samples tables (wandb.Table).
Every value is logged with its own "iteration" as the x-axis (wandb's define_metric), so a resumed run
continues its curves; the wandb run id is kept in run_dir/wandb_id.txt and reused on resume. Offline
runs (WANDB_MODE=offline) need no network. Only the main process tracks."""
from __future__ import annotations

import importlib.util
import math
import os
import secrets

WANDB_ID_FILE = "wandb_id.txt"


def require_wandb() -> None:
    """A ValueError naming the fix when the wandb package is not installed."""
    if importlib.util.find_spec("wandb") is None:
        raise ValueError("logging.wandb is true but the wandb package is not installed: pip install wandb "
                         "(or pip install -e '.[wandb]'), or drop --logging.wandb")


class WandbTracker:
    """One wandb run per run directory (resumed with it)."""

    def __init__(self, run_dir: str, *, project: str, name: str | None, config: dict, resume: bool):
        require_wandb()
        import wandb

        self._wandb = wandb
        run_id = _run_id(run_dir, fresh=not resume)
        self.run = wandb.init(project=project, name=name or os.path.basename(os.path.abspath(run_dir)), dir=run_dir,
                              config=config, id=run_id, resume="allow")
        self.run.define_metric("iteration")
        self.run.define_metric("*", step_metric="iteration")

    def log(self, iteration: int, values: dict, prefix: str = "") -> None:
        """Finite numbers of `values` as prefix + key, at `iteration`."""
        row = {prefix + k: v for k, v in values.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self.run.log({**row, "iteration": iteration})

    def table(self, iteration: int, key: str, rows: list[dict]) -> None:
        if rows:
            columns = list(rows[0])
            table = self._wandb.Table(columns=columns, data=[[row[c] for c in columns] for row in rows])
            self.run.log({key: table, "iteration": iteration})

    def close(self) -> None:
        self.run.finish()


def _run_id(run_dir: str, fresh: bool) -> str:
    """The run directory's wandb id (a new one for a fresh run)."""
    path = os.path.join(run_dir, WANDB_ID_FILE)
    if not fresh and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    run_id = secrets.token_hex(4)
    os.makedirs(run_dir, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(run_id)
    return run_id
