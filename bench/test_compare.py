"""bench/compare.py: two entries of the comparison, each a short engine/train.py run in its own process,
then the table, the JSON with the shared environment record, and the score-vs-KL plot."""
from __future__ import annotations

import json

from bench import compare
from engine import config as C


def test_comparison_command_writes_table_and_plot(tmp_path):
    results = compare.main(["--run_dir", str(tmp_path), "--iterations", "2", "--only", "default", "counting_rloo4"])
    assert [r["algorithm"] for r in results] == ["Rebel", "RLOO"] and results[1]["k"] == 4
    assert (tmp_path / "table.md").read_text().count("\n") == 4
    assert (tmp_path / "reward_vs_kl.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["suite"] == "compare" and [r["preset"] for r in saved["rows"]] == ["default", "counting_rloo4"]
    env = saved["environment"]
    assert {"device", "cpu", "torch", "triton", "transformers", "peers", "git_commit", "date"} <= set(env), env
    # equal reward queries per iteration: RLOO k=4 gets half the prompts
    assert json.loads((tmp_path / "counting_rloo4" / "config.json").read_text())["train"]["prompts_per_iteration"] == 32
    assert [r["prompts"] for r in results] == [64, 32]
    # REBEL from preferences: 2 preference queries per prompt (3 samples); offline DPO: REBEL's 64 pairs
    assert [compare.prompts_per_iteration(C.PRESETS[p]().algorithm)
            for p in ("counting_rebel_preference", "counting_dpo", "counting_lora")] == [64, 64, 64]
