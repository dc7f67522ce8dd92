"""rlhf_core: the engine of the RLHF control room (no UI dependencies).

Subpackages, bottom up (each imports only from those above it in this list):

* ``clinical``: ``cases`` (the case format and loaders), ``verify`` (the
  diagnosis verifier), ``safety`` (the safety checker), ``untrusted`` (the pass
  over uploaded values); no torch;
* ``model``: ``models`` (registry, loading, the frozen reference),
  ``cpu_linear`` (oneDNN linear layers where they beat MKL), ``fastdecode`` (the lean CPU decoding
  step), ``allocator`` (jemalloc);
* ``rollout``: ``records`` (``Trace``, plain data), ``prompts``, ``conclusion``
  (the constrained conclusion step), ``decoding``, ``logprobs``, ``generation``
  (K traces per batch), ``features`` (reward-model features), ``degenerate``,
  ``sampler`` (rejection sampling);
* ``storage``: ``store`` (SQLite; imports no torch), ``export``, ``importer``;
* ``training``: ``losses`` (pure tensor math), ``bounds`` (accepted ranges),
  ``update`` (DPO / GRPO steps), ``checkpoint``, ``train`` (the offline trainer);
* ``reward``: ``reward_data``, ``reward_model``, ``suggest``.

Top level, what the UI and the command line call: ``engine`` (the policy),
``workspaces`` (its workspaces, replay and checkpoints), ``library`` (the case
library a session uses), ``belief`` (what the model believes; the probe set),
``simulate`` (the headless loop), ``evaluate``, ``diagnose``, ``cli``
(``python -m rlhf_core``).
"""

__version__ = "0.1.0"
