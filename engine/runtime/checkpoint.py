"""Resumable distributed checkpoints (model, optimizer, scheduler, data position, RNG) and the final HF export.

    ckpt = Checkpointer(cfg.run_dir, keep=cfg.checkpoint.keep)
    start = ckpt.latest()
    if start is not None:
        extra = ckpt.load(start, model=model, optimizer=optimizer, scheduler=scheduler)
        set_rng_state(extra["rng"], sampler_generator)
    ...
    ckpt.save(it, model=model, optimizer=optimizer, scheduler=scheduler,
              extra={"iteration": it, "data_position": pos, "rng": rng_state(sampler_generator)})

On disk, one directory per checkpoint:

    run_dir/checkpoints/step_00000040/
        .metadata, __0_0.distcp, ...   model + optimizer, torch.distributed.checkpoint (DCP), sharded per rank
        scheduler.pt                   the LR scheduler's state_dict (rank 0)
        extra_rank{r}.pt               the caller's `extra` of rank r (its RNG streams differ from the others')
        meta.json                      iteration and world size of the run that wrote it
        config.json                    the run's resolved config (a resume compares it with its own)

Every rank calls save/load/export_hf (they are collectives under FSDP2); without a process group the same
code runs in one plain process. A checkpoint is written into `.tmp-step_XXXXXXXX`; rank 0 then writes
manifest.json (size and SHA-256 of every file, atomically, last) and renames the directory once every rank
has finished, so a `step_*` directory that exists is complete. A resume (`latest_verified`) checks the newest
against its manifest and falls back to the newest one that verifies, leaving corrupt ones in place;
`.tmp-*` leftovers of a killed run are ignored and deleted by the next save. Multi-node runs need run_dir
on a shared filesystem.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import random
import re
import shutil
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor

_STEP = re.compile(r"step_(\d{8})")
_TMP_PREFIX = ".tmp-"
CONFIG_FILE = "config.json"
MANIFEST = "manifest.json"
_CORRUPT_SUFFIX = ".corrupt"
log = logging.getLogger("rebel")


class CheckpointError(RuntimeError):
    """No checkpoint of the run directory can be resumed from."""


class NonFiniteWeights(ValueError):
    """The weights to export hold NaN or infinite values: nothing is exported."""


# ----------------------------------------------------------------------------------------------
# process-group helpers: every function below also runs without one (a plain single process)
# ----------------------------------------------------------------------------------------------
def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


@contextlib.contextmanager
def _single_process_dcp():
    """Without a process group DCP runs in one process (no_dist) and warns so on every call: silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _fsync_dir(path: str) -> None:
    """Makes a rename or a file creation in `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_file(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_text_atomically(path: str, text: str) -> None:
    """`path` holds either its old content or `text`, never a part (a temp file, fsync, os.replace)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    _write_text(tmp, text)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest(directory: str, iteration: int) -> dict:
    """Size and SHA-256 of every file of a checkpoint directory (written last: a checkpoint whose files
    do not match it is corrupt)."""
    files = {}
    for base, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, directory)
            if rel != MANIFEST:
                files[rel] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
    return {"iteration": iteration, "files": dict(sorted(files.items()))}


def _load_file(path: str) -> Any:
    # Our own files; they hold numpy RNG states and arbitrary picklable counters, hence weights_only=False.
    return torch.load(path, map_location="cpu", weights_only=False)


def _replace_dir(src: str, dst: str) -> None:
    """Renames src to dst; an existing dst is moved aside first and deleted after, so dst is never partial."""
    parent, name = os.path.split(dst)
    old = os.path.join(parent, f"{_TMP_PREFIX}replaced-{name}")
    if os.path.exists(dst):
        shutil.rmtree(old, ignore_errors=True)
        os.rename(dst, old)
    os.rename(src, dst)
    _fsync_dir(parent)
    shutil.rmtree(old, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
class Checkpointer:
    """Saves and restores the full training state under run_dir/checkpoints, keeping the newest `keep`."""

    def __init__(self, run_dir: str, *, keep: int):
        if not isinstance(keep, int) or keep < 1:
            raise ValueError(f"keep must be an int >= 1, got {keep!r}")
        self.root = os.path.join(os.fspath(run_dir), "checkpoints")
        self.keep = keep
        self.corrupt: set[str] = set()  # checkpoints found corrupt by latest_verified: never pruned

    def path(self, iteration: int) -> str:
        return os.path.join(self.root, f"step_{iteration:08d}")

    def iterations(self) -> list[int]:
        """Iterations of the complete checkpoints, oldest first (`.tmp-*` and foreign names ignored)."""
        if not os.path.isdir(self.root):
            return []
        found = (_STEP.fullmatch(name) for name in os.listdir(self.root))
        return sorted(int(m.group(1)) for m in found if m and os.path.isdir(os.path.join(self.root, m.group(0))))

    def latest(self) -> int | None:
        """The newest complete checkpoint's iteration, or None."""
        done = self.iterations()
        return done[-1] if done else None

    def save(self, iteration: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             scheduler: Any | None, extra: dict, config: str | None = None) -> str:
        """Writes a checkpoint of `iteration` (a collective: every rank calls it) and returns its directory.
        `config`: the run's resolved config (JSON), stored beside the state as config.json."""
        if not isinstance(iteration, int) or not 0 <= iteration < 10**8:
            raise ValueError(f"iteration must be an int in [0, 1e8), got {iteration!r}")
        if not isinstance(extra, dict):
            raise ValueError(f"extra must be a dict, got {type(extra).__name__}")
        rank = _rank()
        final = self.path(iteration)
        tmp = os.path.join(self.root, _TMP_PREFIX + os.path.basename(final))
        if rank == 0:
            os.makedirs(self.root, exist_ok=True)
            self._remove_tmp_dirs()  # leftovers of a killed run, and a partial write of this very iteration
            os.makedirs(tmp)
        _barrier()  # nobody writes into tmp before rank 0 has (re)created it

        with _single_process_dcp():
            dcp.save(self._state(model, optimizer), checkpoint_id=tmp, no_dist=not _distributed())
        _save_file(extra, os.path.join(tmp, f"extra_rank{rank}.pt"))
        if rank == 0:
            if scheduler is not None:
                _save_file(scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
            if config is not None:
                _write_text(os.path.join(tmp, CONFIG_FILE), config)
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump({"iteration": iteration, "world_size": _world_size()}, f)
                f.flush()
                os.fsync(f.fileno())
        _barrier()  # every rank's files are in tmp

        if rank == 0:
            write_text_atomically(os.path.join(tmp, MANIFEST), json.dumps(_manifest(tmp, iteration), indent=1))
            if os.path.isdir(final) and final in self.corrupt:  # kept for inspection, never deleted
                os.rename(final, f"{final}{_CORRUPT_SUFFIX}-{os.getpid()}")
            _replace_dir(tmp, final)  # nothing is written into `final` after this
            self._prune()
        _barrier()  # on return, every rank sees the new checkpoint and latest() agrees
        return final

    def load(self, iteration: int, *, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
             scheduler: Any | None) -> dict:
        """Restores model, optimizer and scheduler of `iteration` in place (a collective); returns this rank's extra."""
        path = self.path(iteration) if isinstance(iteration, int) else None
        if path is None or not os.path.isdir(path):
            raise ValueError(f"no checkpoint for iteration {iteration!r} in {self.root} "
                             f"(complete checkpoints: {self.iterations() or 'none'})")
        state = self._state(model, optimizer)  # the shapes and shardings DCP loads into
        with _single_process_dcp():
            dcp.load(state, checkpoint_id=path, no_dist=not _distributed())
        if optimizer is None:
            set_model_state_dict(model, state["model"])
        else:
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if scheduler is not None:
            sched_path = os.path.join(path, "scheduler.pt")
            if not os.path.exists(sched_path):
                raise ValueError(f"checkpoint {path} has no scheduler state, but a scheduler was passed")
            scheduler.load_state_dict(_load_file(sched_path))
        return _load_file(self._extra_path(path))

    def verify(self, iteration: int) -> str | None:
        """None when the checkpoint's files match its manifest (sizes and SHA-256); else what is wrong.
        A checkpoint without a manifest (an earlier release's) passes with a warning."""
        path = self.path(iteration)
        manifest_path = os.path.join(path, MANIFEST)
        if not os.path.exists(manifest_path):
            log.warning("checkpoint %s has no %s (an earlier release's): not verified", path, MANIFEST)
            return None
        try:
            with open(manifest_path, encoding="utf-8") as f:
                files = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return f"unreadable {MANIFEST} ({err})"
        for name, want in sorted(files.items()):
            file = os.path.join(path, name)
            if not os.path.isfile(file):
                return f"{name} is missing"
            size = os.path.getsize(file)
            if size != want["size"]:
                return f"{name} has {size} bytes, the manifest says {want['size']}"
            if _sha256(file) != want["sha256"]:
                return f"{name} does not match its SHA-256 checksum"
        return None

    def latest_verified(self) -> int | None:
        """The newest checkpoint that verifies (a collective: rank 0 checks, every rank gets the answer).
        Corrupt newer ones are named in a warning and left in place; None when there is no checkpoint;
        CheckpointError when there are checkpoints and none verifies."""
        answer: list = [None, []]
        if _rank() == 0:
            bad = []
            for iteration in reversed(self.iterations()):
                problem = self.verify(iteration)
                if problem is None:
                    answer[0] = iteration
                    break
                bad.append((iteration, problem))
                log.warning("checkpoint %s is corrupt (%s): left in place, trying the previous one",
                            self.path(iteration), problem)
            answer[1] = bad
        if _distributed():
            dist.broadcast_object_list(answer, src=0)
        start, bad = answer
        self.corrupt = {self.path(it) for it, _ in bad}
        if start is None and bad:
            listed = "; ".join(f"step_{it:08d}: {problem}" for it, problem in bad)
            raise CheckpointError(f"no checkpoint in {self.root} verifies ({listed}); they are left in place. "
                                  f"Move them away to start afresh, or use a new run directory")
        if bad and start is not None:
            log.warning("resuming from %s instead of the corrupt %s", self.path(start),
                        ", ".join(f"step_{it:08d}" for it, _ in bad))
        return start

    def saved_config(self, iteration: int) -> str | None:
        """The resolved config (JSON) stored with a checkpoint, None for a checkpoint without one."""
        path = os.path.join(self.path(iteration), CONFIG_FILE)
        if not os.path.exists(path):
            return None
        with open(path, encoding="utf-8") as f:
            return f.read()

    # -- internals -------------------------------------------------------------------------------
    @staticmethod
    def _state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
        # get_state_dict handles FSDP2 (DTensor shards) and plain modules alike; on a fresh optimizer it
        # first materializes the state (a zero-lr step), so that DCP has tensors to load into.
        if optimizer is None:
            return {"model": get_model_state_dict(model)}
        model_sd, optim_sd = get_state_dict(model, optimizer)
        return {"model": model_sd, "optim": optim_sd}

    @staticmethod
    def _extra_path(path: str) -> str:
        own = os.path.join(path, f"extra_rank{_rank()}.pt")
        if os.path.exists(own):
            return own
        # Resumed with more ranks than the run that wrote it: model and optimizer reshard, but the new
        # ranks' RNG streams can only be copied from rank 0's (reseed them if they must differ).
        warnings.warn(f"{own} does not exist (world size changed?); rank {_rank()} restores rank 0's extra",
                      stacklevel=2)
        return os.path.join(path, "extra_rank0.pt")

    def _remove_tmp_dirs(self) -> None:
        for name in os.listdir(self.root):
            if name.startswith(_TMP_PREFIX):
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)

    def _prune(self) -> None:
        """The newest `keep` good checkpoints stay; corrupt ones are neither counted nor deleted."""
        good = [it for it in self.iterations() if self.path(it) not in self.corrupt]
        for iteration in good[:-self.keep]:
            shutil.rmtree(self.path(iteration), ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------
def _numpy_random():
    try:
        import numpy
    except ImportError:
        return None
    return numpy.random


def rng_state(*generators: torch.Generator) -> dict:
    """Every RNG a step may draw from: python, numpy (if importable), torch CPU, all CUDA devices, `generators`."""
    np_random = _numpy_random()
    return {
        "python": random.getstate(),
        "numpy": np_random.get_state() if np_random is not None else None,
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "generators": [g.get_state() for g in generators],
    }


def set_rng_state(state: dict, *generators: torch.Generator) -> None:
    """Restores what rng_state saved; `generators` must be the same number, in the same order."""
    saved = state["generators"]
    if len(saved) != len(generators):
        raise ValueError(f"the RNG state holds {len(saved)} generator state(s), but {len(generators)} "
                         f"generator(s) were passed")
    random.setstate(state["python"])
    np_random = _numpy_random()
    if np_random is not None and state["numpy"] is not None:
        np_random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        # A resume on fewer visible devices restores those it has; on a CPU-only machine, none.
        for device, cuda_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    for generator, generator_state in zip(generators, saved):
        generator.set_state(generator_state)


# ----------------------------------------------------------------------------------------------
# final Hugging Face export
# ----------------------------------------------------------------------------------------------
def _is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def _hf_submodule(model: torch.nn.Module) -> tuple[str, torch.nn.Module]:
    """The Hugging Face model itself (prefix "") or the first one inside a wrapper, with its name."""
    for name, module in model.named_modules():
        if callable(getattr(module, "save_pretrained", None)):
            return name, module
    raise ValueError(f"export_hf: {type(model).__name__} neither is nor contains a model with save_pretrained")


def _hf_keys(state_dict: dict, prefix: str) -> dict:
    """Keys relative to the HF model: its prefix in a wrapper and activation-checkpoint wrappers removed."""
    prefix = f"{prefix}." if prefix else ""
    return {key[len(prefix):].replace("_checkpoint_wrapped_module.", ""): value
            for key, value in state_dict.items() if key.startswith(prefix)}


def export_hf(model: torch.nn.Module, tokenizer: Any | None, path: str, save: Any | None = None) -> None:
    """save_pretrained of the full model (and tokenizer) into `path`; a collective under FSDP2, rank 0 writes.

    `model` is a Hugging Face model or a wrapper holding one (e.g. the FSDP root around it); its weights
    are gathered from the shards and written under the HF model's own names. `save(directory, state_dict)`
    replaces the model's save_pretrained (LoRA: write the adapter only, engine/model/lora.py)."""
    prefix, hf_model = _hf_submodule(model)
    if _is_sharded(model):
        # Gathers every shard; with cpu_offload only rank 0 receives the tensors (on CPU), others get {}.
        state_dict = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state_dict = model.state_dict()
    bad = [[key for key, value in state_dict.items() if isinstance(value, torch.Tensor)
            and value.is_floating_point() and not bool(torch.isfinite(value).all())]] if _rank() == 0 else [None]
    if _distributed():
        dist.broadcast_object_list(bad, src=0)
    if bad[0]:
        raise NonFiniteWeights(f"export to {path} refused: non-finite values in {len(bad[0])} tensor(s): "
                               f"{', '.join(bad[0][:5])}{' ...' if len(bad[0]) > 5 else ''}")
    if _rank() == 0:
        path = os.path.abspath(os.fspath(path))
        parent, name = os.path.split(path)
        tmp = os.path.join(parent, f"{_TMP_PREFIX}{name}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        # Tied weights (embeddings = LM head) appear under both names; save_pretrained drops the tied copy.
        (save or (lambda out, sd: hf_model.save_pretrained(out, state_dict=sd)))(tmp, _hf_keys(state_dict, prefix))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _replace_dir(tmp, path)
    _barrier()
