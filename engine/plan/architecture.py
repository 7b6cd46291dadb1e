"""A model's shape, read without loading it: from a local directory's config.json, from the Hugging Face
cache (config.json only, never a download), or from the built-in table below (the presets' models and
the engine's random built-ins), and the parameter counts the planner needs.

The table holds each architecture's datasheet fields (hidden size, layers, heads, kv heads, MLP width,
vocabulary, tied embeddings); tests/test_run_plan.py checks the built-ins' counts against the models
engine/data/tasks.py builds (on the meta device) and the hub models' against their published counts.
"""
from __future__ import annotations

import dataclasses
import json
import os

# Families whose MLP is two matrices with biases and whose norms are LayerNorms (weight and bias);
# every other family counts as Llama-like: gated MLP (gate, up, down), RMSNorm, no biases.
PLAIN_MLP = ("gpt_neox", "gpt2", "gptj", "codegen", "phi", "falcon", "bloom", "opt", "gpt_bigcode", "stablelm")
HALF = ("bfloat16", "float16")
UNTIED_BY_DEFAULT = ("gpt_neox", "llama", "mistral", "qwen2", "qwen3", "olmo2", "granite", "stablelm")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Architecture:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool  # the LM head is the input embedding
    gated: bool = True  # Llama's gate/up/down MLP; False: GPT-NeoX's two matrices
    biases: bool = False  # linear layers and norms carry biases (GPT-NeoX)
    classifier: bool = False  # a sequence-classification head (one row) instead of the LM head
    stored_bytes: int = 4  # element size of the checkpoint's weights (a reward model loads in it: dtype "auto")

    def layer_params(self) -> int:
        """Parameters of one decoder layer."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        attention = self.hidden * (q + 2 * kv) + q * self.hidden
        mlp = (3 if self.gated else 2) * self.hidden * self.intermediate
        norms = 2 * self.hidden * (2 if self.biases else 1)
        biases = (q + 2 * kv + self.hidden + self.intermediate + self.hidden) if self.biases else 0
        return attention + mlp + norms + biases

    def matmul_params(self) -> int:
        """Weights one token multiplies through in the body (the FLOPs: 2 per weight and token)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * (self.hidden * (q + 2 * kv) + q * self.hidden
                              + (3 if self.gated else 2) * self.hidden * self.intermediate)

    @property
    def head_params(self) -> int:
        return self.hidden if self.classifier else self.vocab * self.hidden

    def embedding_params(self) -> int:
        """Input embedding, final norm and the head (the FSDP2 root group)."""
        head = 0 if (self.tied and not self.classifier) else self.head_params
        return self.vocab * self.hidden + head + self.hidden * (2 if self.biases else 1)

    def params(self) -> int:
        return self.layers * self.layer_params() + self.embedding_params()

    def kv_bytes_per_token(self, elt: int) -> int:
        """KV cache bytes of one token (keys and values of every layer), as the sampler sizes it."""
        return 2 * self.layers * self.kv_heads * self.head_dim * elt

    def lora_params(self, rank: int) -> int:
        """Adapter parameters of rank `rank` on every linear layer of the decoder ('all-linear')."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        shapes = [(h, q), (h, kv), (h, kv), (q, h)] + [(h, i)] * (2 if self.gated else 1) + [(i, h)]
        return self.layers * sum(rank * (a + b) for a, b in shapes)


def _llama(hidden, layers, heads, kv_heads, intermediate, vocab, *, tied=False, classifier=False) -> Architecture:
    return Architecture(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, head_dim=hidden // heads,
                        intermediate=intermediate, vocab=vocab, tied=tied, classifier=classifier)


def _neox(hidden, layers, heads, vocab, *, classifier=False) -> Architecture:
    return Architecture(hidden=hidden, layers=layers, heads=heads, kv_heads=heads, head_dim=hidden // heads,
                        intermediate=4 * hidden, vocab=vocab, tied=False, gated=False, biases=True,
                        classifier=classifier)


_PYTHIA = {"1.4b": (2048, 24, 16, 50304), "2.8b": (2560, 32, 32, 50304), "6.9b": (4096, 32, 32, 50432)}
_LLAMA3_8B = (4096, 32, 32, 8, 14336, 128256)

KNOWN: dict[str, Architecture] = {
    # the engine's random built-ins (engine/data/tasks.py; the character vocabulary has 15 tokens)
    "builtin:tiny-llama": _llama(64, 2, 4, 2, 128, 15),
    "builtin:llama-32k-random": _llama(256, 4, 4, 4, 688, 32000),
    "builtin:pythia-1.4b-random": _neox(2048, 24, 16, 50304),
    # the presets' hub models
    "meta-llama/Meta-Llama-3-8B-Instruct": _llama(*_LLAMA3_8B),
    "meta-llama/Meta-Llama-3-8B": _llama(*_LLAMA3_8B),
    "RLHFlow/ArmoRM-Llama3-8B-v0.1": dataclasses.replace(  # its gating / regression heads: ~1M parameters
        _llama(*_LLAMA3_8B, classifier=True), stored_bytes=2),
    **{f"EleutherAI/pythia-{s}-deduped": _neox(*shape) for s, shape in _PYTHIA.items()},
    **{f"vwxyzjn/EleutherAI_pythia-{s}-deduped__sft__tldr": _neox(*shape) for s, shape in _PYTHIA.items()},
    **{f"vwxyzjn/EleutherAI_pythia-{s}-deduped__reward__tldr": _neox(*shape, classifier=True)
       for s, shape in _PYTHIA.items()},
}

_FIELDS = {  # what the planner reads -> the names families give it in config.json
    "hidden_size": ("hidden_size", "n_embd", "d_model"),
    "num_hidden_layers": ("num_hidden_layers", "n_layer", "num_layers"),
    "num_attention_heads": ("num_attention_heads", "n_head"),
    "vocab_size": ("vocab_size",),
}


def architecture(name: str, *, classifier: bool = False) -> Architecture:
    """The shape of the model `name` (a local directory, a hub id or builtin:NAME), without its weights.
    A local directory is read first, then the hub cache, then the built-in table."""
    config = os.path.join(name, "config.json")
    if os.path.isdir(name):
        if not os.path.isfile(config):
            raise ValueError(f"cannot plan {name!r}: the directory has no config.json")
        return _read(config, classifier)
    cached = _hub_cached_config(name)
    if cached is not None:
        return _read(cached, classifier)
    if name in KNOWN:
        return dataclasses.replace(KNOWN[name], classifier=classifier or KNOWN[name].classifier)
    raise ValueError(f"cannot plan {name!r}: not a local directory with a config.json, not in the Hugging Face "
                     f"cache, not a known architecture (known: {', '.join(sorted(KNOWN))})")


def _hub_cached_config(name: str) -> str | None:
    """config.json of a hub id when it is in the local cache (no network)."""
    if name.startswith("builtin:") or name.count("/") != 1:
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    path = try_to_load_from_cache(name, "config.json")
    return path if isinstance(path, str) else None


def _read(path: str, classifier: bool) -> Architecture:
    with open(path) as f:
        raw = json.load(f)
    return from_config(raw.get("text_config") or raw, source=path, classifier=classifier)


def from_config(raw: dict, *, source: str, classifier: bool = False) -> Architecture:
    """An Architecture from a config.json's dict; a missing field raises a ValueError naming it."""
    def field(name: str) -> int:
        for alias in _FIELDS[name]:
            if raw.get(alias) is not None:
                return int(raw[alias])
        looked = ", ".join(_FIELDS[name])
        raise ValueError(f"cannot plan from {source}: config.json has no {name} (looked for {looked})")

    hidden, heads = field("hidden_size"), field("num_attention_heads")
    family = raw.get("model_type", "")
    plain = family in PLAIN_MLP
    intermediate = raw.get("intermediate_size") or raw.get("n_inner") or raw.get("ffn_dim") or 4 * hidden
    return Architecture(hidden=hidden, layers=field("num_hidden_layers"), heads=heads,
                        kv_heads=int(raw.get("num_key_value_heads") or heads),
                        head_dim=int(raw.get("head_dim") or hidden // heads), intermediate=int(intermediate),
                        vocab=field("vocab_size"),
                        tied=bool(raw.get("tie_word_embeddings", family not in UNTIED_BY_DEFAULT)),
                        gated=not plain, biases=plain or bool(raw.get("attention_bias", False)), classifier=classifier,
                        stored_bytes=2 if str(raw.get("dtype") or raw.get("torch_dtype")) in HALF else 4)
