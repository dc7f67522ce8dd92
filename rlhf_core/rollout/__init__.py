"""Rollouts: prompts, K traces decoded per batch with their conclusion step, per-token
log-probs and reward-model features, and rejection sampling into verified traces."""
