"""Training: the pure preference losses, the accepted ranges of every setting, the online
DPO / GRPO update, checkpoints, and the offline trainer (accelerate)."""
