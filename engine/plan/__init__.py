"""Plan a run before it starts: predicted memory per device (by part, under FSDP2) and time per phase of
one iteration, for any config on 1 to 64 GPUs of a known kind (devices.py) or this CPU, from the config,
the model's config.json (or a built-in table of architectures) and the fused op's plan. Never loads
weights and imports no model code (torch comes in with rebel_kernels, whose plan module sizes the op's
working memory, and measures the CPU's rates).

    python engine/train.py --preset tldr_pythia_6b9 --plan --plan.gpus 8 --plan.device h100

Files: devices.py (datasheets, links, the CPU measured), architecture.py (a model's shape and parameter
counts), workload.py (tokens per process: generation chunks, packed micro-batches, passes), memory.py
(bytes by part, the two peaks), timing.py (phase rooflines), run_plan.py (`plan_run` -> `Plan`),
report.py (the table, the one line, the refusal with the keys that would make a config fit).
"""
from .architecture import KNOWN, Architecture, architecture, from_config
from .devices import DEVICES, KINDS, Device, device, kind_of, measure_cpu
from .report import one_line, refusal, remedies, render
from .run_plan import Plan, plan_run, resolve_device

__all__ = ["DEVICES", "KINDS", "KNOWN", "Architecture", "Device", "Plan", "architecture", "device", "from_config",
           "kind_of", "measure_cpu", "one_line", "plan_run", "refusal", "remedies", "render", "resolve_device"]
