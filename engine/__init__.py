"""The REBEL training engine: generation loop, rollouts, rewards, FSDP2 training, checkpoints."""
