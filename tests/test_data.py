"""Prompt loading through `datasets` and JSONL, filtering, and the resumable prompt order."""
import json

import pytest

from engine.config import DataConfig
from engine.data import prompts as data
from engine.data.tasks import char_tokenizer, counting_prompts, counting_reward


def test_datasets_directory_and_jsonl_give_the_same_prompts(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = counting_prompts(30)
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "ds"))
    with open(tmp_path / "p.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    tok = char_tokenizer()
    a = data.prepare(data.load_rows(DataConfig(prompts=str(tmp_path / "ds"))), tok, DataConfig())
    b = data.prepare(data.load_rows(DataConfig(prompts=str(tmp_path / "p.jsonl"))), tok, DataConfig())
    assert a.prompts == b.prompts == [r["prompt"] for r in rows]


def test_invalid_and_long_rows_are_skipped_and_counted():
    rows = [{"prompt": "123"}, {"prompt": ""}, {"nope": "1"}, {"prompt": "1234567"}, {"prompt": 5}]
    out = data.prepare(rows, char_tokenizer(), DataConfig(max_prompt_tokens=5))
    assert out.prompts == ["123"] and out.skipped == 4


def test_prompt_order_resumes_exactly_and_crosses_epochs():
    order = data.PromptOrder(10, seed=3)
    first = order.take(7)
    state = order.state_dict()
    rest = order.take(8)  # crosses into epoch 1
    again = data.PromptOrder(10, seed=3)
    again.load_state_dict(state)
    assert again.take(8) == rest
    assert sorted(first + rest[:3]) == list(range(10))  # epoch 0 is a permutation
    with pytest.raises(ValueError, match="size"):
        data.PromptOrder(11, seed=3).load_state_dict(state)


def test_left_pad():
    ids, mask = data.left_pad([[5, 6, 7], [8]], pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_counting_reward_is_the_stated_objective():
    assert counting_reward(["345"], ["6789"]) == [1.0]
    assert counting_reward(["9"], ["01"]) == [0.5]
    assert counting_reward(["12"], ["35"]) == [0.0]
    assert counting_reward(["12"], ["55"]) == [-0.5]
    assert counting_reward(["12"], [""]) == [-0.5]


def test_bad_jsonl_lines_are_skipped_with_file_and_line(tmp_path, caplog):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "123"}\n\n{"prompt": "45"\n{"prompt": "\xff\xfe"}\n[1, 2]\n{"prompt": "67"}\n')
    with caplog.at_level("WARNING"):
        out = data.prepare(data.load_rows(DataConfig(prompts=str(path))), char_tokenizer(), DataConfig())
    assert out.prompts == ["123", "67"] and out.skipped == 1  # the list row; 2 unreadable lines never became rows
    assert f"{path}:3: skipped: not valid JSON" in caplog.text
    assert f"{path}:4: skipped: not UTF-8 (byte 0xff at column 13)" in caplog.text
    assert f"data {path}:5 skipped: expected a JSON object, got list" in caplog.text


def test_a_file_of_only_bad_lines_fails_naming_the_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("not json\n")
    with pytest.raises(ValueError, match="no usable prompt"):
        data.prepare(data.load_rows(DataConfig(prompts=str(path))), char_tokenizer(), DataConfig())


def test_json_files_a_list_or_json_lines(tmp_path):
    rows = counting_prompts(5)
    (tmp_path / "list.json").write_text(json.dumps(rows))
    (tmp_path / "lines.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("list.json", "lines.json"):
        assert data.load_rows(DataConfig(prompts=str(tmp_path / name))) == rows, name
    (tmp_path / "scalar.json").write_text("5")
    with pytest.raises(ValueError, match="scalar.json: expected a list of objects or JSON lines, got a JSON int"):
        data.load_rows(DataConfig(prompts=str(tmp_path / "scalar.json")))


@pytest.mark.parametrize("name, why", [("prompts.txt", "not a file type the engine reads"),
                                       ("missing.jsonl", "no such file or directory")])
def test_unknown_paths_list_the_accepted_sources(tmp_path, name, why):
    (tmp_path / "prompts.txt").write_text("123\n")
    with pytest.raises(ValueError, match=why) as err:
        data.load_rows(DataConfig(prompts=str(tmp_path / name)))
    assert "accepted sources" in str(err.value) and "*.jsonl" in str(err.value) and "builtin:" in str(err.value)
