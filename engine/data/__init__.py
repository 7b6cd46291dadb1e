"""What the policy is trained on and scored by: prompt sets and their order (prompts), reward and
preference functions or models and the missing-EOS rules (rewards), the built-in task, models and
tokenizer (tasks). Imports: torch, transformers, datasets, engine.config; nothing else of the engine."""
