"""The command line's side of a config: `--section.key value` overrides checked against each field's
type, the --help listing (each field's own help, engine/config/sections.py), config.json in and out, and
which differences a resume may accept."""
from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing

from engine.algorithms import DPO, RLOO, IterativeDPO, Rebel, RebelPreference, Reinforce

from .presets import default
from .sections import TrainConfig

ALGORITHMS = {cls.__name__: cls for cls in (Rebel, Reinforce, RLOO, IterativeDPO, DPO, RebelPreference)}  # from_json

# Keys of earlier releases (the REBEL-only `rebel` section): rejected with the new name.
RENAMED = {"rebel.kl_coef": "reward.kl_coef", "rebel.prompts_per_iteration": "train.prompts_per_iteration",
           "rebel.num_epochs": "train.num_epochs", "rebel.minibatches": "train.minibatches",
           "rebel.micro_batch_pairs": "train.micro_batch_prompts",
           "train.micro_batch_pairs": "train.micro_batch_prompts"}

# Fields that do not change what is trained (where things go, what is shown, speed/memory knobs):
# a resume may change them freely. Every other field differing from the checkpoint's stops a resume.
NOT_TRAJECTORY = ("run_dir", "logging.", "checkpoint.", "eval.", "plan.", "generation.check_every",
                  "generation.compact_finished", "generation.kv_budget_bytes", "train.micro_batch_prompts",
                  "reward.batch_size", "model.activation_checkpointing")


def _field_types(obj) -> dict:
    """field name -> its resolved type (annotations are strings under `from __future__ import annotations`)."""
    return typing.get_type_hints(type(obj))


def _parse(key: str, text: str, annotation):
    """Convert a CLI string to the field's type (str, int, float, bool, or Optional of those)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        annotation = next(a for a in args if a is not type(None))
    try:
        if annotation is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        return annotation(text)
    except ValueError:
        raise ValueError(f"--{key}: cannot read {text!r} as {annotation.__name__}") from None


def apply_overrides(cfg: TrainConfig, pairs: list[tuple[str, str]]) -> TrainConfig:
    """Return a new config with `section.key=value` overrides applied and re-validated."""
    sections = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}
    changes: dict[str, dict] = {}
    top: dict = {}
    for key, text in pairs:
        if key in RENAMED or key == "rebel":
            raise ValueError(f"--{key} was renamed: use --{RENAMED.get(key, 'train.<field>')}")
        name, _, field = key.partition(".")
        if name not in sections:
            raise ValueError(f"unknown config key --{key}{_suggest(name, sections)}")
        if not field:
            if dataclasses.is_dataclass(sections[name]):
                raise ValueError(f"--{key} is a section; set --{key}.<field>")
            top[name] = _parse(key, text, _field_types(cfg)[name])
            continue
        names = [f.name for f in dataclasses.fields(sections[name])]
        if field not in names:
            raise ValueError(f"unknown config key --{key}{_suggest(field, names, prefix=name + '.')}")
        changes.setdefault(name, {})[field] = _parse(key, text, _field_types(sections[name])[field])
    new_sections = {n: dataclasses.replace(sections[n], **c) for n, c in changes.items()}
    return dataclasses.replace(cfg, **top, **new_sections)


def _suggest(word: str, options, prefix: str = "") -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean --{prefix}{close[0]}?)" if close else ""


def _flatten(raw: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in raw.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def trajectory_changes(saved_json: str, cfg: TrainConfig) -> list[tuple[str, object, object]]:
    """(key, old, new) for each field that changes the trajectory and differs between a checkpoint's
    saved config and `cfg` (fields the saved config does not know are not compared)."""
    old, new = _flatten(json.loads(saved_json)), _flatten(json.loads(to_json(cfg)))
    return [(key, old[key], new[key]) for key in sorted(new)
            if key in old and old[key] != new[key] and not key.startswith(NOT_TRAJECTORY)]


def describe(cfg: TrainConfig | None = None) -> list[tuple[str, str, object, str]]:
    """(section.key, type, default, one line of help) of every field of a config (default: `default()`)."""
    cfg = cfg or default()
    rows = []

    def visit(obj, prefix):
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if dataclasses.is_dataclass(value):
                visit(value, f"{prefix}{f.name}.")
                continue
            kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
            rows.append((f"{prefix}{f.name}", kind, value, f.metadata.get("help", "")))

    visit(cfg, "")
    return rows


def help_text(cfg: TrainConfig | None = None) -> str:
    """The --help listing: one line per --section.key with its type, default and help."""
    rows = describe(cfg)
    width = max(len(key) for key, *_ in rows) + 2
    lines = [f"  --{key:<{width}} {kind} = {value!r}" + (f"\n  {'':<{width + 2}} {text}" if text else "")
             for key, kind, value, text in rows]
    return "\n".join(lines)


def to_json(cfg: TrainConfig) -> str:
    raw = dataclasses.asdict(cfg)
    raw["algorithm"]["class"] = type(cfg.algorithm).__name__
    return json.dumps(raw, indent=2, sort_keys=True)


def from_json(text: str) -> TrainConfig:
    raw = _renamed_sections(json.loads(text))
    sections = _field_types(TrainConfig())
    kwargs = {}
    for name, value in raw.items():
        if name == "algorithm":
            value = dict(value)
            kwargs[name] = ALGORITHMS[value.pop("class")](**value)
        elif isinstance(value, dict):
            kwargs[name] = sections[name](**value)
        elif name in sections:
            kwargs[name] = value
    return TrainConfig(**kwargs)


def _renamed_sections(raw: dict) -> dict:
    """A config.json of an earlier release (a `rebel` section) in today's names."""
    old = raw.pop("rebel", None)
    if old is not None:
        for key, value in old.items():
            section, field = RENAMED[f"rebel.{key}"].split(".")
            raw.setdefault(section, {})[field] = value
    return raw
