"""rlhf_core: the engine of the RLHF control room (no UI dependencies).

Modules, one concern each: ``models`` (registry, loading, reference),
``prompts``, ``generation`` (sampling traces), ``logprobs``, ``losses`` (pure
tensor math), ``update`` (DPO / GRPO steps), ``checkpoint``, ``cases``,
``verify``, ``safety``, ``sampler`` (rejection sampling), ``engine`` (the
facade the UI calls) and ``simulate`` (the headless loop).
"""

__version__ = "0.1.0"
