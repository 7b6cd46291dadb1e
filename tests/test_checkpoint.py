"""engine/runtime/checkpoint.py: exact resume in one process and under 2-process FSDP2 (gloo), atomic layout,
HF export."""
import copy
import os
import random
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tokenizers import Tokenizer, models
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from engine.runtime.checkpoint import Checkpointer, export_hf, rng_state, set_rng_state

VOCAB = 97


def _llama(seed: int, tie: bool = False) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return LlamaForCausalLM(cfg)


def _tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


class _Wrapper(torch.nn.Module):
    """Like the engine's FSDP root: holds the HF model as `lm`, decoder layers activation-checkpointed."""

    def __init__(self, lm):
        super().__init__()
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        self.lm = lm
        for i, layer in enumerate(lm.model.layers):
            lm.model.layers[i] = checkpoint_wrapper(layer)


def _optim(model):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return optimizer, scheduler


def _step(model, optimizer, scheduler, gen: torch.Generator) -> torch.Tensor:
    """One AdamW step on data drawn from all three RNGs (the generator, torch's global one, python's)."""
    length = int(torch.randint(4, 9, ()))
    ids = torch.randint(3, VOCAB, (2, length), generator=gen)
    loss = model(input_ids=ids, labels=ids).loss * (1 + random.random())
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _snapshot(model, optimizer, scheduler) -> dict:
    return {"params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "optim": copy.deepcopy(optimizer.state_dict()), "sched": copy.deepcopy(scheduler.state_dict())}


def _draws(gen: torch.Generator) -> list:
    return [torch.rand(4), random.random(), np.random.rand(), torch.rand(4, generator=gen)]


def test_single_process_resume_is_exact(tmp_path):
    random.seed(0)
    np.random.seed(0)
    gen = torch.Generator().manual_seed(1)
    model = _llama(seed=0)
    optimizer, scheduler = _optim(model)
    _step(model, optimizer, scheduler, gen)  # optimizer state exists
    ckpt = Checkpointer(str(tmp_path), keep=2)
    path = ckpt.save(1, model=model, optimizer=optimizer, scheduler=scheduler,
                     extra={"rng": rng_state(gen), "data_position": 17})
    assert path == str(tmp_path / "checkpoints" / "step_00000001")
    assert {"scheduler.pt", "extra_rank0.pt", "meta.json", ".metadata"} <= set(os.listdir(path))
    assert ckpt.latest() == 1
    saved = _snapshot(model, optimizer, scheduler)
    expected = _draws(gen)

    for _ in range(2):  # perturb weights, optimizer state, scheduler and every RNG
        _step(model, optimizer, scheduler, gen)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    _draws(gen)

    extra = ckpt.load(1, model=model, optimizer=optimizer, scheduler=scheduler)
    set_rng_state(extra["rng"], gen)
    assert extra["data_position"] == 17
    restored = _snapshot(model, optimizer, scheduler)
    for name, p in saved["params"].items():
        assert torch.equal(restored["params"][name], p), name
    assert restored["optim"]["param_groups"] == saved["optim"]["param_groups"]
    assert saved["optim"]["state"].keys() == restored["optim"]["state"].keys()
    for idx, state in saved["optim"]["state"].items():
        for key, value in state.items():
            assert torch.equal(restored["optim"]["state"][idx][key], value), (idx, key)
    assert restored["sched"] == saved["sched"]
    assert optimizer.param_groups[0]["lr"] == saved["optim"]["param_groups"][0]["lr"]
    got = _draws(gen)
    for a, b in zip(got, expected):
        assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_keep_pruning_and_tmp_leftovers(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer, scheduler = _optim(model)
    ckpt = Checkpointer(str(tmp_path), keep=2)
    assert ckpt.latest() is None
    for it in (1, 2):
        ckpt.save(it, model=model, optimizer=optimizer, scheduler=scheduler, extra={"it": it})
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000009").mkdir()  # a killed run's partial checkpoint, newer than any complete one
    (root / ".tmp-step_00000009" / "junk").write_text("partial")
    (root / "step_12").mkdir()  # not ours: ignored
    assert ckpt.latest() == 2
    for it in (3, 3):  # a second save of the same iteration replaces it
        ckpt.save(it, model=model, optimizer=optimizer, scheduler=scheduler, extra={"it": it})
    assert sorted(os.listdir(root)) == ["step_00000002", "step_00000003", "step_12"]
    assert ckpt.iterations() == [2, 3] and ckpt.latest() == 3
    assert ckpt.load(2, model=model, optimizer=optimizer, scheduler=scheduler) == {"it": 2}
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(str(tmp_path), keep=0)


def test_load_missing_iteration_raises(tmp_path):
    model = torch.nn.Linear(3, 2)
    optimizer, scheduler = _optim(model)
    ckpt = Checkpointer(str(tmp_path), keep=1)
    with pytest.raises(ValueError, match="no checkpoint for iteration 5"):
        ckpt.load(5, model=model, optimizer=optimizer, scheduler=scheduler)
    ckpt.save(4, model=model, optimizer=optimizer, scheduler=scheduler, extra={})
    with pytest.raises(ValueError, match=r"iteration 5 .*\[4\]"):
        ckpt.load(5, model=model, optimizer=optimizer, scheduler=scheduler)


def test_set_rng_state_checks_generator_count():
    with pytest.raises(ValueError, match="1 generator state"):
        set_rng_state(rng_state(torch.Generator()))


def test_export_hf_tied_single_process(tmp_path):
    model = _llama(seed=3, tie=True)
    export_hf(model, _tokenizer(), str(tmp_path / "hf"))
    export_hf(model, _tokenizer(), str(tmp_path / "hf"))  # a second export replaces the first
    assert sorted(os.listdir(tmp_path)) == ["hf"]
    loaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    for name, p in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], p), name
    assert PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "hf")).vocab_size == VOCAB


def test_export_hf_through_wrapper(tmp_path):
    export_hf(_Wrapper(_llama(seed=4)), None, str(tmp_path / "hf"))
    loaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf")).state_dict()
    reference = _llama(seed=4).state_dict()
    assert loaded.keys() == reference.keys()
    for name, p in reference.items():
        assert torch.equal(loaded[name], p), name


# ----------------------------------------------------------------------------------------------
# 2-process FSDP2 on gloo
# ----------------------------------------------------------------------------------------------
def _sharded_llama(seed: int):
    from torch.distributed.fsdp import fully_shard

    model = _llama(seed)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _full_params(model) -> dict:
    return {n: p.full_tensor().clone() for n, p in model.named_parameters()}


def _fsdp_worker(rank, world, port, run_dir, out_dir):
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        random.seed(10 + rank)
        torch.manual_seed(20 + rank)
        gen = torch.Generator().manual_seed(30 + rank)
        model = _sharded_llama(seed=0)
        optimizer, scheduler = _optim(model)
        _step(model, optimizer, scheduler, gen)
        ckpt = Checkpointer(run_dir, keep=2)
        ckpt.save(1, model=model, optimizer=optimizer, scheduler=scheduler, extra={"rng": rng_state(gen), "rank": rank})
        losses = [_step(model, optimizer, scheduler, gen) for _ in range(2)]
        params = _full_params(model)

        # A fresh process state: other weights, an optimizer without state, a new scheduler and generator.
        torch.manual_seed(99)
        model = _sharded_llama(seed=5)
        optimizer, scheduler = _optim(model)
        gen = torch.Generator()
        extra = ckpt.load(ckpt.latest(), model=model, optimizer=optimizer, scheduler=scheduler)
        set_rng_state(extra["rng"], gen)
        resumed = [_step(model, optimizer, scheduler, gen) for _ in range(2)]
        resumed_params = _full_params(model)

        export_hf(model, _tokenizer(), os.path.join(out_dir, "hf"))
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

        # The engine's layout: an FSDP root wrapping the HF model, tied embeddings, checkpointed layers.
        from torch.distributed.fsdp import fully_shard

        wrapper = _Wrapper(_llama(seed=6, tie=True))
        for layer in wrapper.lm.model.layers:
            fully_shard(layer)
        fully_shard(wrapper)
        export_hf(wrapper, None, os.path.join(out_dir, "hf_wrapper"))
        torch.save({"rank": extra["rank"], "losses": losses, "resumed": resumed, "params": params,
                    "resumed_params": resumed_params, "full": full}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    # Leave without interpreter teardown: gloo's background threads can abort the process there
    # ("terminate called without an active exception", seen once in CI) after all work succeeded.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_gloo_resume_and_export(tmp_path):
    """Two steps after a resume into fresh objects give bitwise the losses and weights of the uninterrupted run."""
    if not dist.is_available():
        pytest.skip("torch built without distributed")
    ctx = mp.get_context("spawn")
    port = _free_port()
    run_dir = str(tmp_path / "run")
    procs = [ctx.Process(target=_fsdp_worker, args=(r, 2, port, run_dir, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")) == ["step_00000001"]
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for rank, res in enumerate(results):
        assert res["rank"] == rank  # each rank restored its own extra
        assert torch.equal(torch.stack(res["resumed"]), torch.stack(res["losses"])), rank
        for name, p in res["params"].items():
            assert torch.equal(res["resumed_params"][name], p), (rank, name)
    assert not torch.equal(results[0]["losses"][0], results[1]["losses"][0])  # ranks drew different data

    full = results[0]["full"]
    assert results[1]["full"] == {}
    for name, p in full.items():
        assert torch.equal(p, results[0]["resumed_params"][name]), name
    loaded = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf"))
    assert loaded.config.architectures == ["LlamaForCausalLM"]
    state = loaded.state_dict()
    assert state.keys() == full.keys()
    for name, p in full.items():
        assert torch.equal(state[name], p), name

    wrapped = LlamaForCausalLM.from_pretrained(str(tmp_path / "hf_wrapper"))
    assert wrapped.lm_head.weight.data_ptr() == wrapped.model.embed_tokens.weight.data_ptr()
    reference = _llama(seed=6, tie=True).state_dict()
    assert wrapped.state_dict().keys() == reference.keys()
    for name, p in reference.items():
        assert torch.equal(wrapped.state_dict()[name], p), name


# ----------------------------------------------------------------------------------------------
# corrupt checkpoints: manifest, fallback, clear error; finite export
# ----------------------------------------------------------------------------------------------
def _truncate(path):
    shard = next(p for p in path.iterdir() if p.suffix == ".distcp")
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])


def _garbage_metadata(path):
    (path / ".metadata").write_bytes(b"garbage")


def _missing_extra(path):
    (path / "extra_rank0.pt").unlink()


def _flipped_bytes(path):
    shard = next(p for p in path.iterdir() if p.suffix == ".distcp")
    raw = bytearray(shard.read_bytes())
    for i in range(len(raw) // 2, len(raw) // 2 + 16):
        raw[i] ^= 0xFF
    shard.write_bytes(bytes(raw))  # same size


@pytest.mark.parametrize("corrupt", [_truncate, _garbage_metadata, _missing_extra, _flipped_bytes])
def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, corrupt, caplog):
    from engine.runtime.checkpoint import MANIFEST, CheckpointError

    model = _llama(seed=0)
    optimizer, scheduler = _optim(model)
    ckpt = Checkpointer(str(tmp_path), keep=2)
    for it in (1, 2):
        ckpt.save(it, model=model, optimizer=optimizer, scheduler=scheduler, extra={"it": it})
    root = tmp_path / "checkpoints"
    assert (root / "step_00000002" / MANIFEST).exists() and ckpt.verify(2) is None
    corrupt(root / "step_00000002")
    with caplog.at_level("WARNING", logger="rebel"):
        assert ckpt.latest_verified() == 1
    assert "step_00000002 is corrupt" in caplog.text
    assert (root / "step_00000002").is_dir()  # never deleted
    assert ckpt.load(1, model=model, optimizer=optimizer, scheduler=scheduler) == {"it": 1}
    # the next saves do not prune the good one in favour of the corrupt one, nor delete the corrupt one
    ckpt.save(3, model=model, optimizer=optimizer, scheduler=scheduler, extra={"it": 3})
    assert {"step_00000001", "step_00000002", "step_00000003"} <= set(os.listdir(root))
    corrupt(root / "step_00000001")
    corrupt(root / "step_00000003")
    with pytest.raises(CheckpointError, match=r"no checkpoint in .* verifies \(step_00000003: .*step_00000001: "):
        ckpt.latest_verified()


def test_export_refuses_non_finite_weights(tmp_path):
    from engine.runtime.checkpoint import NonFiniteWeights

    model = _llama(seed=0)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteWeights, match=r"non-finite values in 1 tensor\(s\): model.layers.1.mlp.up_proj"):
        export_hf(model, None, str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()
