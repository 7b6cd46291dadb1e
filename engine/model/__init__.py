"""The model's forward: the LM head's description, the training forward (packed or padded) to token
log-probabilities through the fused op, the engine's attention functions (blockwise SDPA/eager, flash-attn
varlen), LoRA, Liger-Kernel, and the generation loop. Imports: torch, transformers, rebel_kernels,
engine.config; nothing else of the engine."""
