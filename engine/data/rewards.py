"""Reward functions: a Hugging Face sequence-classification reward model (with its own tokenizer and
chat template), or a Python function given by import path. Both map (prompts, responses) -> scores.
For REBEL from preferences: a pairwise preference model or a function, (prompts, responses, others)
-> P(response > other | prompt)."""
from __future__ import annotations

import dataclasses
import importlib
import logging
import numbers
from collections.abc import Callable
from typing import Protocol

import torch

from engine.config import RewardConfig, TrainConfig
from engine.data.tasks import BUILTIN_PREFERENCES, BUILTIN_REWARDS

log = logging.getLogger("rebel")


class RewardFn(Protocol):
    def __call__(self, prompts: list[str], responses: list[str]) -> list[float] | torch.Tensor: ...


def import_function(path: str, builtins: dict = BUILTIN_REWARDS, key: str = "reward.function") -> Callable:
    """'package.module:function' (or builtin:NAME for the built-in tasks) -> the callable."""
    if path.startswith("builtin:"):
        name = path.split(":", 1)[1]
        if name not in builtins:
            raise ValueError(f"{key}: unknown built-in {name!r}; known: {sorted(builtins)}")
        return builtins[name]
    module, sep, attr = path.partition(":")
    if not sep or not attr:
        raise ValueError(f"{key} must look like 'package.module:function', got {path!r}")
    fn = getattr(importlib.import_module(module), attr, None)
    if not callable(fn):
        raise ValueError(f"{key} {path!r} is not a callable")
    return fn


class _SequenceClassifier:
    """A Hugging Face sequence-classification model with its own tokenizer; `_first_logit(texts)` [n]."""

    def __init__(self, path: str, *, device, batch_size: int, dtype=None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype).to(device).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.device, self.batch_size = device, batch_size
        self.name = f"{type(self).__name__}({path!r})"  # how errors about its outputs name it

    def _chat(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    @torch.no_grad()
    def _first_logit(self, texts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[i : i + self.batch_size], return_tensors="pt", padding=True, truncation=True,
                                 add_special_tokens=not self.tokenizer.chat_template).to(self.device)
            out.append(self.model(**enc).logits[:, 0].float())
        return torch.cat(out)


class RewardModel(_SequenceClassifier):
    """Scores with a sequence-classification model. The response text is re-encoded with the reward
    model's own tokenizer (and chat template, when it has one), never fed as policy token ids."""

    def _format(self, prompt: str, response: str) -> str:
        if self.tokenizer.chat_template:
            return self._chat([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}])
        return prompt + response

    def __call__(self, prompts: list[str], responses: list[str]) -> torch.Tensor:
        return self._first_logit([self._format(p, r) for p, r in zip(prompts, responses)])


class PreferenceModel(_SequenceClassifier):
    """P(a > b | x) from a pairwise sequence-classification model that reads the prompt and both
    responses (`template` with {prompt}, {a}, {b}; inside the model's chat template as one user turn
    when it has one) and outputs one logit, P = sigmoid(logit). Both orders are scored and averaged,
        P(a > b) = (sigmoid(f(x, a, b)) + 1 - sigmoid(f(x, b, a))) / 2,
    so that P(a > b) + P(b > a) = 1 exactly (l = 2P - 1 is skew-symmetric, as REBEL from preferences needs)."""

    def __init__(self, path: str, *, device, batch_size: int, template: str, dtype=None):
        super().__init__(path, device=device, batch_size=batch_size, dtype=dtype)
        self.template = template

    def _format(self, prompt: str, a: str, b: str) -> str:
        text = self.template.format(prompt=prompt, a=a, b=b)
        return self._chat([{"role": "user", "content": text}]) if self.tokenizer.chat_template else text

    def __call__(self, prompts: list[str], responses: list[str], others: list[str]) -> torch.Tensor:
        forward = self._first_logit([self._format(p, a, b) for p, a, b in zip(prompts, responses, others)])
        backward = self._first_logit([self._format(p, b, a) for p, a, b in zip(prompts, responses, others)])
        return (torch.sigmoid(forward) + 1 - torch.sigmoid(backward)) / 2


def build_reward(cfg: RewardConfig, *, default: str | None, device, dtype=None,
                 required: bool = True) -> RewardFn | None:
    """The reward model or function; the built-in task's reward by default. None when nothing is
    configured and the algorithm can do without (offline DPO, REBEL from preferences)."""
    if cfg.model:
        return RewardModel(cfg.model, device=device, batch_size=cfg.batch_size, dtype=dtype)
    if cfg.function:
        return import_function(cfg.function)
    if default:
        return import_function(default)
    if required:
        raise ValueError("no reward: set reward.model or reward.function")
    return None


def build_preference(cfg: RewardConfig, *, default: str | None, device, dtype=None):
    """The preference model or function (prompts, responses, others) -> P(response > other)."""
    if cfg.preference_model:
        return PreferenceModel(cfg.preference_model, device=device, batch_size=cfg.batch_size,
                               template=cfg.preference_template, dtype=dtype)
    if cfg.preference_function:
        return import_function(cfg.preference_function, BUILTIN_PREFERENCES, "reward.preference_function")
    task = default.split(":", 1)[1] if default else None  # the built-in task's preference, if it has one
    if task in BUILTIN_PREFERENCES:
        return BUILTIN_PREFERENCES[task]
    raise ValueError("no preference model: set reward.preference_model or reward.preference_function")


@dataclasses.dataclass(frozen=True)
class Feedback:
    """What scores the responses: a reward (None: none configured, allowed for offline DPO and REBEL
    from preferences) and, for algorithms that need one, a preference model."""

    reward: RewardFn | None
    prefer: Callable | None = None


def build_feedback(cfg: TrainConfig, device) -> Feedback:
    """The reward and, for algorithms that read preferences, the preference model of a run."""
    algo = cfg.algorithm
    default = cfg.data.prompts if cfg.data.prompts.startswith("builtin:") else None
    needs_reward = not (algo.offline or algo.needs_preferences)
    reward = build_reward(cfg.reward, default=default, device=device, required=needs_reward)
    prefer = build_preference(cfg.reward, default=default, device=device) if algo.needs_preferences else None
    return Feedback(reward=reward, prefer=prefer)


def function_name(fn) -> str:
    """How errors name a reward or preference: its `name`, else its import path 'module:qualname'."""
    name = getattr(fn, "name", None)
    if isinstance(name, str):
        return name
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if module and qualname:
        return f"{module}:{qualname}"
    return repr(fn)


SKIPS_UPDATE = "this iteration's update is skipped"  # what non-finite feedback means in training


def checked_output(out, count: int, fn, *, what: str, unit: str, inputs: str, device,
                   if_non_finite: str = SKIPS_UPDATE) -> torch.Tensor:
    """A reward's or preference model's output as float32 [count] on device. Anything but a list/tuple of
    real numbers, a 1-D array or tensor of reals (one per input, [count, 1] accepted) is an error naming
    the function; non-finite values are kept (the loop skips the iteration) and warned about."""
    name = function_name(fn)
    kind = f"{type(out).__name__}: {out!r}"[:200]
    if isinstance(out, (list, tuple)):
        for j, value in enumerate(out):
            if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{what} {name} must return a list of {count} {unit} (real numbers); item {j} is "
                                f"{type(value).__name__}: {value!r}"[:300])
        tensor = torch.as_tensor([float(v) for v in out], dtype=torch.float64)
    elif isinstance(out, torch.Tensor) or type(out).__module__ == "numpy":
        tensor = torch.as_tensor(out)
        if tensor.dtype == torch.bool or tensor.dtype.is_complex:
            raise TypeError(f"{what} {name} must return real numbers, got a {tensor.dtype} tensor")
        if tensor.dim() == 2 and tensor.shape[1] == 1:
            tensor = tensor[:, 0]
        if tensor.dim() != 1:
            raise ValueError(f"{what} {name} must return one value per input ({count} {inputs}), got shape "
                             f"{tuple(tensor.shape)}")
    else:
        raise TypeError(f"{what} {name} must return a list of {count} {unit} or a 1-D tensor, got {kind}")
    if tensor.numel() != count:
        raise ValueError(f"{what} {name} returned {tensor.numel()} {unit} for {count} {inputs}")
    tensor = tensor.to(device=device, dtype=torch.float32)
    bad = ~torch.isfinite(tensor)
    if bool(bad.any()):
        log.warning("%s %s returned %d non-finite %s of %d (first at input %d): %s", what, name, int(bad.sum()),
                    unit, count, int(bad.nonzero()[0, 0]), if_non_finite)
    return tensor


def score(reward: RewardFn, prompts: list[str], responses: list[str], device, *,
          if_non_finite: str = SKIPS_UPDATE) -> torch.Tensor:
    """Call the reward and return float32 scores on device; a wrong type or count is an error naming it."""
    return checked_output(reward(prompts, responses), len(prompts), reward, what="the reward", unit="scores",
                          inputs="responses", device=device, if_non_finite=if_non_finite)


def preferences(prefer, prompts: list[str], responses: list[str], others: list[str], device, *,
                what: str = "the preference model", if_non_finite: str = SKIPS_UPDATE) -> torch.Tensor:
    """Call the preference model: float32 [n] P(responses[j] > others[j] | prompts[j]) on device.
    A wrong type or count, or a finite value outside [0, 1], is an error naming the function (non-finite
    ones are the loop's to skip); `what` names its role (the preference model, the judge)."""
    out = checked_output(prefer(prompts, responses, others), len(prompts), prefer, what=what,
                         unit="probabilities", inputs="pairs", device=device, if_non_finite=if_non_finite)
    finite = out[torch.isfinite(out)]
    if finite.numel() and not bool(((finite >= 0) & (finite <= 1)).all()):
        raise ValueError(f"{what} {function_name(prefer)} must return probabilities in [0, 1], got "
                         f"min {finite.min().item()} max {finite.max().item()}")
    return out
def apply_eos_rule(prefs: torch.Tensor, finished: torch.Tensor, anchor_finished: torch.Tensor) -> torch.Tensor:
    """The missing-EOS penalty for preferences: a response that never emitted EOS loses to a finished
    one whatever the model says (P = 0, or 1 when only the other is cut), two cut responses tie (P = 1/2)."""
    cut, anchor_cut = ~finished, ~anchor_finished
    out = torch.where(cut & ~anchor_cut, torch.zeros_like(prefs), prefs)
    out = torch.where(~cut & anchor_cut, torch.ones_like(prefs), out)
    return torch.where(cut & anchor_cut, torch.full_like(prefs, 0.5), out)


def apply_eos_penalty(raw: torch.Tensor, finished: torch.Tensor, penalty: float) -> torch.Tensor:
    """A response that never emitted EOS gets `penalty` instead of its score (replace, not subtract)."""
    return torch.where(finished, raw, torch.full_like(raw, penalty))


