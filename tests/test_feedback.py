"""Offline DPO on a preference dataset and REBEL from preferences in the loop: the data path, the
preference model, the missing-EOS rule, and the losses the loop computes against plain formulas."""
import dataclasses
import json
import math

import pytest
import torch
import torch.nn.functional as F

from engine import config as C
from engine.build import build
from engine.data import prompts as data
from engine.data import rewards
from engine.data.rewards import build_feedback
from engine.data.tasks import char_tokenizer, counting_preference, counting_preference_pairs, counting_reward
from engine.iteration.batch import preference_pairs
from engine.iteration.collect import collect, collect_preference_pairs, rollout_stats
from engine.iteration.update import update
from engine.model.packing import IGNORE
from engine.train import train
from tests.test_train import _metrics, _plain_logprobs, _with

# ----------------------------------------------------------------------------------------------
# offline DPO
# ----------------------------------------------------------------------------------------------


def test_builtin_preference_pairs_are_labelled_by_the_reward():
    rows = counting_preference_pairs(200)
    chosen = counting_reward([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    rejected = counting_reward([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert all(c > r for c, r in zip(chosen, rejected))
    assert counting_preference_pairs(200) == rows  # seeded


def test_response_columns_accept_text_and_chat_transcripts(tmp_path):
    tok = char_tokenizer()
    rows = [{"prompt": "12", "chosen": "34", "rejected": "5"},
            {"prompt": "45", "chosen": [{"role": "user", "content": "45"}, {"role": "assistant", "content": "67"}],
             "rejected": [{"role": "user", "content": "45"}, {"role": "assistant", "content": "0"}]},
            {"prompt": "7", "chosen": 3, "rejected": "1"},  # not text: skipped and counted
            {"prompt": "8", "rejected": "1"}]  # missing column: skipped and counted
    cfg = C.DataConfig(prompts="x.jsonl", chosen_column="chosen", rejected_column="rejected")
    ps = data.prepare(rows, tok, cfg)
    assert ps.prompts == ["12", "45"] and ps.skipped == 2
    assert ps.responses == {"chosen": ["34", "67"], "rejected": ["5", "0"]}


def _dpo_cfg(tmp_path, **over):
    base = C.PRESETS["counting_dpo"]()
    return dataclasses.replace(base, run_dir=str(tmp_path), train=C.IterationConfig(prompts_per_iteration=8,
                                                                                   micro_batch_prompts=3, num_epochs=1),
                               optim=C.OptimConfig(iterations=2, lr=1e-2),
                               logging=C.LoggingConfig(tensorboard=False, plots=False, progress=False),
                               checkpoint=C.CheckpointConfig(every=0, export_hf=False), **over)


def test_preference_pairs_batch_and_the_dpo_step_match_plain_pytorch(tmp_path):
    cfg = _dpo_cfg(tmp_path)
    run = build(cfg)
    reference, ps = run.reference_lp.lm, run.prompts
    chosen = [3, 0, 7, 11, 2, 5, 9, 1]
    batch = collect_preference_pairs(run, chosen)
    b = batch.groups
    assert b == 8 and batch.samples == 2 and not batch.sampled.any()
    assert batch.responses[:b] == [ps.responses["chosen"][i] for i in chosen]
    assert batch.responses[b:] == [ps.responses["rejected"][i] for i in chosen]
    assert batch.finished.all()  # EOS appended to every dataset response
    lengths = (batch.labels != IGNORE).sum(-1)
    assert lengths.tolist() == [len(t) + 1 for t in batch.responses]
    torch.testing.assert_close(batch.ref_logprobs, _plain_logprobs(reference, batch, 1.0).detach(),
                               rtol=1e-5, atol=1e-5)
    # the loop's DPO loss (micro-batches of 3, 3, 2 prompts) is the plain formula on the whole batch
    out = update(_with(run, cfg), batch).metrics
    plain = _plain_logprobs(reference, batch, 1.0).detach().sum(-1)  # policy == reference before the step
    seq_ref = batch.ref_logprobs.sum(-1)
    margin = 0.05 * ((plain[:b] - seq_ref[:b]) - (plain[b:] - seq_ref[b:]))
    assert out["loss/first"] == pytest.approx(-F.logsigmoid(margin).mean().item(), rel=1e-5)
    assert out["loss/first"] == pytest.approx(math.log(2), rel=1e-5)  # policy == reference: margin 0


def test_preference_pairs_are_cut_at_max_new_tokens():
    tok = char_tokenizer()
    ids, mask = data.left_pad([[5, 6]], tok.pad_token_id, "cpu")
    ro = preference_pairs(ids, mask, ["123456789"], ["1"], tok, [tok.eos_token_id], max_tokens=4)
    assert ro.response_ids.shape == (2, 4) and ro.finished.tolist() == [False, True]


def test_dpo_runs_in_the_loop_and_monitors_the_policy_by_sampling(tmp_path):
    stats = train(_dpo_cfg(tmp_path))
    assert math.isfinite(stats["loss/last"]) and "score/mean" in stats  # built-in reward: monitored
    assert 0 <= stats["algorithm/accuracy"] <= 1


def test_dpo_without_a_reward_does_not_sample(tmp_path):
    with open(tmp_path / "prefs.jsonl", "w") as f:
        for row in counting_preference_pairs(16):
            f.write(json.dumps(row) + "\n")
    cfg = _dpo_cfg(tmp_path / "run", data=C.DataConfig(prompts=str(tmp_path / "prefs.jsonl"), chosen_column="chosen",
                                                        rejected_column="rejected"),
                   eval=C.EvalConfig())  # nothing would score the preset's held-out responses
    stats = train(cfg)
    assert math.isfinite(stats["loss/last"]) and "time/generate" not in stats and "score/mean" not in stats


@pytest.mark.parametrize("preset, pairs, match", [
    ("counting_dpo", [("data.chosen_column", "none")], "chosen_column and data.rejected_column"),
    ("default", [("data.chosen_column", "a"), ("data.rejected_column", "b")], "offline algorithms"),
    ("default", [("reward.preference_function", "builtin:counting")], "read by RebelPreference"),
    ("counting_rebel_preference", [("reward.preference_function", "m:f"), ("reward.preference_model", "x")],
     "at most one"),
])
def test_feedback_config_errors_name_the_keys(preset, pairs, match):
    with pytest.raises(ValueError, match=match):
        C.apply_overrides(C.PRESETS[preset](), pairs)


def test_rebel_preference_on_own_data_needs_a_preference_model(tmp_path):
    cfg = C.PRESETS["counting_rebel_preference"]()
    with pytest.raises(ValueError, match="needs a preference model"):
        dataclasses.replace(cfg, data=C.DataConfig(prompts=str(tmp_path / "p.jsonl")))


# ----------------------------------------------------------------------------------------------
# REBEL from preferences
# ----------------------------------------------------------------------------------------------


def test_eos_rule_for_preferences():
    p = torch.tensor([0.9, 0.9, 0.2, 0.7])
    fin = torch.tensor([True, False, True, False])
    anchor = torch.tensor([True, True, False, False])
    assert rewards.apply_eos_rule(p, fin, anchor).tolist() == pytest.approx([0.9, 0.0, 1.0, 0.5])


def test_builtin_preference_is_bradley_terry_on_the_reward():
    p = counting_preference(["12", "12"], ["34", "3"], ["3", "34"])
    assert p[0] == pytest.approx(torch.sigmoid(torch.tensor(1.0)).item()) and p[0] + p[1] == pytest.approx(1.0)


def half_preference(prompts, responses, others):
    return [0.5] * len(prompts)


def out_of_range_preference(prompts, responses, others):
    return [1.5] * len(prompts)


def test_preference_function_by_import_path_and_checks():
    fn = rewards.build_preference(C.RewardConfig(preference_function="test_feedback:half_preference"),
                                  default=None, device="cpu")
    assert rewards.preferences(fn, ["1"], ["2"], ["3"], "cpu").tolist() == [0.5]
    with pytest.raises(ValueError, match=r"probabilities in \[0, 1\]"):
        rewards.preferences(out_of_range_preference, ["1"], ["2"], ["3"], "cpu")
    with pytest.raises(ValueError, match="2 probabilities for 1 pairs"):
        rewards.preferences(lambda p, r, o: [0.5, 0.5], ["1"], ["2"], ["3"], "cpu")
    with pytest.raises(ValueError, match="no preference model"):
        rewards.build_preference(C.RewardConfig(), default=None, device="cpu")


def test_preference_model_is_skew_symmetric(tmp_path):
    """A pairwise sequence-classification model saved locally: P(a > b) + P(b > a) = 1 exactly."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = char_tokenizer()
    tok.save_pretrained(tmp_path / "pm")
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=1, num_attention_heads=4, num_labels=1,
                                               pad_token_id=tok.pad_token_id)).save_pretrained(tmp_path / "pm")
    pm = rewards.PreferenceModel(str(tmp_path / "pm"), device="cpu", batch_size=2, template="{prompt}:{a} {b}")
    prompts, a, b = ["12", "345", "9"], ["34", "6", "0123"], ["3", "67", ""]
    ab, ba = pm(prompts, a, b), pm(prompts, b, a)
    assert ab.shape == (3,) and ((ab >= 0) & (ab <= 1)).all() and (ab - 0.5).abs().max() > 0
    torch.testing.assert_close(ab + ba, torch.ones(3), rtol=0, atol=1e-6)
    torch.testing.assert_close(pm(prompts, a, a), torch.full((3,), 0.5), rtol=0, atol=1e-6)
    cfg = C.apply_overrides(C.PRESETS["counting_rebel_preference"](),
                            [("reward.preference_model", str(tmp_path / "pm"))])
    assert isinstance(build_feedback(cfg, "cpu").prefer, rewards.PreferenceModel)


def _preference_iteration(tmp_path):
    cfg = C.PRESETS["counting_rebel_preference"]()
    cfg = dataclasses.replace(cfg, run_dir=str(tmp_path), train=C.IterationConfig(prompts_per_iteration=8,
                                                                                  micro_batch_prompts=3, num_epochs=1),
                              optim=C.OptimConfig(iterations=2, lr=1e-2),
                              logging=C.LoggingConfig(tensorboard=False, plots=False, progress=False),
                              checkpoint=C.CheckpointConfig(every=0, export_hf=False))
    run = build(cfg)
    batch, gen_s = collect(run, list(range(8)))
    return run, batch, rollout_stats(batch, gen_s, run.dist, cfg.reward.kl_coef)


def test_rebel_preference_batch_and_step_match_plain_pytorch(tmp_path):
    run, batch, stats = _preference_iteration(tmp_path)
    cfg, policy = run.cfg, run.policy
    b = batch.groups
    assert b == 8 and batch.labels.shape[0] == 24 and batch.anchor_preferences.shape == (16,)
    prompts, ys, anchors = batch.prompts[:b], batch.responses, batch.responses[2 * b:]
    want = counting_preference(prompts * 2, ys[: 2 * b], anchors * 2)
    want = rewards.apply_eos_rule(want, batch.finished[: 2 * b], batch.finished[2 * b:].repeat(2))
    torch.testing.assert_close(batch.anchor_preferences, want)
    assert "preference/mean" in stats and "score/mean" in stats  # the built-in reward monitors the task
    # the step skips the anchors' forward; its loss and gradients are REBEL's on (y, y') with
    # targets l(y, y'') - l(y', y'') = 2 (P(y > y'') - P(y' > y'')), plain PyTorch
    twin = [p.detach().clone() for p in policy.parameters()]
    out = update(_with(run, cfg), batch).metrics
    grads = [p.grad.clone() for p in policy.parameters()]
    with torch.no_grad():
        for p, q in zip(policy.parameters(), twin):
            p.copy_(q)
    policy.zero_grad()
    pair = slice(0, 2 * b)
    sub = dataclasses.replace(batch, input_ids=batch.input_ids[pair], attention_mask=batch.attention_mask[pair],
                              labels=batch.labels[pair])
    seq = _plain_logprobs(policy, sub, 1.0).sum(-1) - batch.old_logprobs[pair].sum(-1)
    kl = batch.old_logprobs[pair].sum(-1) - batch.ref_logprobs[pair].sum(-1)
    r = 2 * batch.anchor_preferences - 1 - cfg.reward.kl_coef * kl
    torch.testing.assert_close(batch.rewards, r)  # the shaped reward the loop carries to the loss
    loss = (((seq[:b] - seq[b:]) / cfg.algorithm.eta - (r[:b] - r[b:])) ** 2).mean()
    loss.backward()
    assert out["loss/first"] == pytest.approx(loss.item(), rel=1e-5)
    for g, p in zip(grads, policy.parameters()):
        assert (g - p.grad).norm().item() <= 1e-4 * (p.grad.norm().item() + 1e-12)


def test_rebel_preference_runs_in_the_loop(tmp_path):
    cfg = dataclasses.replace(C.PRESETS["counting_rebel_preference"](), run_dir=str(tmp_path),
                              train=C.IterationConfig(prompts_per_iteration=8, micro_batch_prompts=4),
                              optim=C.OptimConfig(iterations=2),
                              logging=C.LoggingConfig(tensorboard=False, plots=False, progress=False),
                              checkpoint=C.CheckpointConfig(every=0, export_hf=False))
    stats = train(cfg)
    assert math.isfinite(stats["loss/last"]) and 0 <= stats["preference/mean"] <= 1
    assert len(_metrics(tmp_path)) == 2


def nan_preference(prompts, responses, others):
    return [float("nan")] * len(prompts)


def test_non_finite_preference_skips_the_update(tmp_path):
    cfg = dataclasses.replace(
        C.apply_overrides(C.PRESETS["counting_rebel_preference"](),
                          [("reward.preference_function", "test_feedback:nan_preference")]),
        run_dir=str(tmp_path), train=C.IterationConfig(prompts_per_iteration=4, micro_batch_prompts=4),
        optim=C.OptimConfig(iterations=1), logging=C.LoggingConfig(tensorboard=False, plots=False, progress=False),
        checkpoint=C.CheckpointConfig(every=0, export_hf=False))
    stats = train(cfg)
    assert stats["skipped_batches"] == 1 and "loss/first" not in stats


def test_ultrafeedback_schema_from_a_datasets_directory(tmp_path):
    """The ultrafeedback_dpo preset's data layout (HuggingFaceH4/ultrafeedback_binarized: split train_prefs,
    a prompt string, chosen/rejected chat transcripts), saved locally, through offline DPO with LoRA."""
    import datasets

    def chat(prompt, answer):
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]

    rows = counting_preference_pairs(16)
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list([
        {"prompt": r["prompt"], "chosen": chat(r["prompt"], r["chosen"]), "rejected": chat(r["prompt"], r["rejected"])}
        for r in rows])}).save_to_disk(str(tmp_path / "uf"))
    cfg = C.PRESETS["ultrafeedback_dpo_llama3_8b"]()
    cfg = dataclasses.replace(
        cfg, run_dir=str(tmp_path / "run"),
        model=dataclasses.replace(cfg.model, policy="builtin:tiny-llama", lora_rank=4),
        data=dataclasses.replace(cfg.data, prompts=str(tmp_path / "uf"), chat_template=False),
        generation=dataclasses.replace(cfg.generation, max_new_tokens=8),
        train=dataclasses.replace(cfg.train, prompts_per_iteration=8, micro_batch_prompts=4),
        optim=C.OptimConfig(iterations=2, lr=1e-3),
        logging=C.LoggingConfig(tensorboard=False, plots=False, progress=False),
        checkpoint=C.CheckpointConfig(every=0, export_hf=False))
    stats = train(cfg)
    assert stats["loss/first"] != 0 and math.isfinite(stats["loss/last"]) and "time/generate" not in stats
    # first iteration: LoRA starts at the base model, so every margin is exactly 0 and the loss is log 2
    assert _metrics(tmp_path / "run")[0]["loss/first"] == pytest.approx(math.log(2), rel=1e-6)
