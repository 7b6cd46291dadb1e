"""Evaluation on held-out prompts, the way the REBEL paper reports results: the policy's responses
(near-greedy by default) scored by the run's reward, against a reference response (score, win rate,
optionally a preference model's and a judge's P(policy > reference)), the sequence KL to the reference
policy, lengths and EOS rates; one row of run_dir/eval.jsonl per evaluation and a samples table.

    heldout.py    the held-out prompts and their references, split into fixed batches
    scoring.py    per-prompt records -> the row's metrics (pure functions, hand-checkable)
    records.py    eval.jsonl, the samples tables, TensorBoard and eval.png (resume-safe)
    evaluator.py  `Evaluator`: generate, score, KL, gather over ranks, write
"""
