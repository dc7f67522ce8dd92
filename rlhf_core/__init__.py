"""rlhf_core: the engine of the RLHF control room (no UI dependencies).

Layers, bottom up, one concern per module:

* model: ``models`` (registry, loading, the frozen reference), ``checkpoint``,
  ``cpu_linear`` (oneDNN linear layers), ``fastdecode`` (the lean CPU decoding
  step), ``allocator`` (jemalloc);
* clinical: ``cases`` (the case format and loaders), ``library`` (the case
  library a session uses), ``verify`` (diagnosis verifier), ``degenerate``,
  ``safety``, ``untrusted`` (the pass over uploaded values);
* rollout: ``prompts``, ``decoding``, ``conclusion`` (the constrained
  conclusion step), ``generation`` (K traces per batch), ``logprobs``,
  ``features`` (reward-model features), ``sampler`` (rejection sampling);
* training: ``losses`` (pure tensor math), ``bounds`` (accepted ranges),
  ``update`` (DPO / GRPO steps), ``train`` (the offline trainer), ``belief``
  (what the model believes; the probe set);
* reward model: ``reward_data``, ``reward_model``, ``suggest``;
* storage: ``store`` (SQLite), ``export``, ``importer``;
* the facade and tools: ``engine`` (what the UI calls), ``simulate`` (the
  headless loop), ``evaluate``, ``diagnose``, ``cli`` (``python -m rlhf_core``).
"""

__version__ = "0.1.0"
