"""The model: registry and loading (full fine-tuning or LoRA, the frozen reference), and the
CPU speed-ups (oneDNN linear layers, the lean decoding step, jemalloc)."""
