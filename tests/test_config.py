"""engine/config/: presets, typed overrides, clear errors, JSON round trip, the CLI parser."""
import pytest

from engine import config as C
from engine.train import parse_args


@pytest.mark.parametrize("name", sorted(C.PRESETS))
def test_every_preset_builds_and_round_trips(name):
    cfg = C.PRESETS[name]()
    assert C.from_json(C.to_json(cfg)) == cfg


def test_overrides_are_typed():
    cfg = C.apply_overrides(C.default(), [("optim.lr", "1e-4"), ("generation.temperature", "0.7"), ("seed", "3"),
                                          ("optim.max_grad_norm", "none"), ("logging.plots", "false"),
                                          ("data.partner_column", "chosen")])
    assert (cfg.optim.lr, cfg.generation.temperature, cfg.seed) == (1e-4, 0.7, 3)
    assert cfg.optim.max_grad_norm is None and cfg.logging.plots is False and cfg.data.partner_column == "chosen"


@pytest.mark.parametrize("pairs, match", [
    ([("optim.lrr", "1")], r"unknown config key --optim.lrr \(did you mean --optim.lr\?\)"),
    ([("optm.lr", "1")], "unknown config key --optm.lr"),
    ([("optim.lr", "fast")], "--optim.lr: cannot read 'fast' as float"),
    ([("optim.lr", "-1")], "optim.lr must be > 0"),
    ([("algorithm.eta", "0")], "eta must be finite and > 0"),
    ([("algorithm.samples_per_prompt", "4")], "Rebel needs samples_per_prompt == 2"),
    ([("logging.plots", "maybe")], "--logging.plots"),
    ([("generation.temperature", "0")], "temperature must be > 0"),
    ([("generation.samples_per_prompt", "3")], "samples_per_prompt must be 2"),
    ([("model.dtype", "float16")], "model.dtype"),
    ([("train.minibatches", "3")], "divisible"),
    ([("rebel.num_epochs", "2")], "renamed: use --train.num_epochs"),
    ([("rebel.micro_batch_pairs", "2")], "renamed: use --train.micro_batch_prompts"),
    ([("rebel.kl_coef", "0.1")], "renamed: use --reward.kl_coef"),
    ([("optim", "1")], "is a section"),
    ([("train.micro_batch_tokens", "0")], "train.shared_prefix needs packing"),
    ([("train.micro_batch_tokens", "-5")], "train.micro_batch_tokens must be >= 0"),
    ([("model.attn_implementation", "flash")], "model.attn_implementation must be one of sdpa, eager"),
])
def test_bad_overrides_name_the_key(pairs, match):
    with pytest.raises(ValueError, match=match):
        C.apply_overrides(C.default(), pairs)


def test_cli_parses_preset_and_overrides():
    cfg = parse_args(["--preset", "tldr_pythia_1b4", "--optim.lr", "1e-6", "--algorithm.eta", "0.5"])
    assert cfg.optim.lr == 1e-6 and cfg.algorithm.eta == 0.5 and cfg.train.prompts_per_iteration == 512
    with pytest.raises(SystemExit):
        parse_args(["--optim.lr"])  # a key without a value


@pytest.mark.parametrize("key, value, match", [
    ("reward.missing_eos_penalty", "nan", "reward.missing_eos_penalty must be finite, got nan"),
    ("reward.missing_eos_penalty", "-inf", "reward.missing_eos_penalty must be finite"),
    ("optim.max_grad_norm", "inf", "optim.max_grad_norm must be finite"),
    ("model.lora_alpha", "nan", "model.lora_alpha must be finite"),
    ("generation.top_p", "nan", "top_p"),
    ("seed", "-1", "seed must be >= 0"),
    ("run_dir", " ", "run_dir must not be empty"),
])
def test_every_value_is_validated_when_the_config_is_built(key, value, match):
    with pytest.raises(ValueError, match=match):
        C.apply_overrides(C.default(), [(key, value)])


def test_cli_config_error_is_one_line_and_exit_2(tmp_path, capsys):
    from engine.train import main

    with pytest.raises(SystemExit) as exit_:
        main(["--run_dir", str(tmp_path), "--optim.iterations", "1", "--reward.missing_eos_penalty", "nan"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reward.missing_eos_penalty must be finite" in err
    assert not (tmp_path / "config.json").exists()  # nothing was built
