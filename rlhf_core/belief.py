"""What the model believes about a case, and a probe set that tracks it per update.

*Belief*: the probability the model gives each candidate conclusion (the
answer and the distractors, or the options) when asked to conclude right
after the case prompt: ``<prompt> Final diagnosis: <candidate><eos>`` scored
by teacher forcing, per token (as the constrained conclusion step scores them),
normalised over the candidates. One forward of the prompt, then the C short
continuations in one forward sharing its key/value cache. Deterministic: no
sampling noise, so a change between versions is the update's doing.

*Probe set*: a few cases taught in the workspace and a few held-out ones,
scored after every update: the mean probability of the correct diagnosis and
top-1 accuracy per group, and the KL between reference and policy on fixed
completions (the best ranked trace of each taught case, with the reference
log-probs stored when it was sampled; k3 estimate of KL(reference || policy)),
so the KL line is cumulative and comparable across versions. Those traces are
the ones trained on, so this measures movement on what was taught and runs above
the distribution-level KL; reference samples of the held-out cases would be the
unbiased choice (not done yet).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .clinical.cases import Case
from .rollout.conclusion import SCAFFOLD_TEXT, candidate_probs, candidate_scores, candidates
from .model.cpu_linear import onednn_linear
from .rollout.decoding import score_branches
from .rollout.records import Trace
from .rollout.logprobs import collate, completion_logps
from .training.losses import k3_kl
from .model.models import LoadedModel
from .rollout.prompts import build_messages, encode_prompt


def correct_index(case: Case, names: list[str]) -> int:
    """Which candidate is the right one (``candidates`` shuffles free-text names)."""
    if case.options:
        return int(case.answer_idx)
    key = " ".join(case.answer.lower().split())
    return next(i for i, n in enumerate(names) if " ".join(n.lower().split()) == key)


def _continuations(lm: LoadedModel, names: list[str]) -> list[list[int]]:
    """Each candidate's conclusion after the prompt: the scaffold, the name, the end token."""
    return [_scaffold(lm) + branch for branch in _branches(lm, names)]


def _scaffold(lm: LoadedModel) -> list[int]:
    return lm.tokenizer.encode("\n" + SCAFFOLD_TEXT, add_special_tokens=False)


def _branches(lm: LoadedModel, names: list[str]) -> list[list[int]]:
    end = lm.tokenizer.eos_token_id
    return [lm.tokenizer.encode(" " + n, add_special_tokens=False) + ([end] if end is not None else []) for n in names]


@dataclass
class SharedPrefix:
    """The keys and values of the tokens every probe prompt starts with (the system
    prompt: ~40% of a SmolLM2 probe prompt), computed once per scoring under one model."""

    tokens: list[int]
    kv: list[tuple[torch.Tensor, torch.Tensor]]

    @classmethod
    def of(cls, model, lm: LoadedModel, prompts: list[list[int]]) -> "SharedPrefix | None":
        """The longest common prefix of ``prompts`` (at least two, each longer than it), or None."""
        if len(prompts) < 2:
            return None
        n = 0
        shortest = min(len(p) for p in prompts)
        while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
            n += 1
        return cls(prompts[0][:n], _prompt_cache(model, lm, prompts[0][:n])) if n else None


def _prompt_cache(model, lm: LoadedModel, prompt: list[int],
                  prefix: SharedPrefix | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's keys and values for ``prompt`` (one forward, only the last logits kept),
    continuing ``prefix``'s cache when the prompt starts with it."""
    from transformers import DynamicCache

    start, cache = 0, None
    if prefix is not None and len(prompt) > len(prefix.tokens) and prompt[: len(prefix.tokens)] == prefix.tokens:
        start, cache = len(prefix.tokens), DynamicCache()
        for index, (keys, values) in enumerate(prefix.kv):  # the update concatenates: prefix.kv stays as it is
            cache.update(keys, values, index)
    device = lm.device
    rest = torch.tensor([prompt[start:]], device=device)
    positions = start + torch.arange(rest.shape[1], device=device)
    with torch.no_grad(), onednn_linear(model, enabled=device.type == "cpu"):  # ~2x MKL on AMD (cpu_linear.py)
        out = model(input_ids=rest, past_key_values=cache, use_cache=True, logits_to_keep=1,
                    position_ids=positions[None], cache_position=positions)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def candidate_beliefs(model, lm: LoadedModel, case: Case, how: str = "per_token", completions: list[Trace] = (),
                      prefix: SharedPrefix | None = None) -> tuple[list[float], list[list[float]]]:
    """P(candidate) for each of ``candidates(case)`` under ``model`` (the policy, or
    the reference from ``lm.reference()``), and the teacher-forced log-probs of each of
    ``completions`` (traces of this case's prompt) from the same prompt pass (which
    continues ``prefix``, computed under the same ``model``, when given)."""
    names = candidates(case)
    prompt = encode_prompt(lm.tokenizer, build_messages(case))
    kv = _prompt_cache(model, lm, prompt, prefix)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    # one forward: the scaffold once, each candidate after it (decoding.score_branches)
    (_, per_candidate), = score_branches(model, kv, [0], [len(prompt) - 1], [[prompt[-1], *_scaffold(lm)]],
                                         _branches(lm, names), pad)
    probs = candidate_probs(candidate_scores(per_candidate, how))
    if not completions:
        return probs, []
    assert all(t.prompt_ids == prompt for t in completions), "completions must continue the case's prompt"
    (_, scored), = score_branches(model, kv, [0], [len(prompt) - 1], [[prompt[-1]]],
                                  [t.completion_ids for t in completions], pad)
    return probs, scored


def belief(lm: LoadedModel, case: Case, reference: bool = False, completions: list[Trace] = (),
           prefix: SharedPrefix | None = None) -> dict:
    """{"names", "probs", "correct", "p_correct", "top1", "completion_logps"} for one case
    (``completion_logps``: per-token log-probs of ``completions``, see ``candidate_beliefs``;
    ``prefix``: the policy's cache of a prompt prefix, never with ``reference``)."""
    names = candidates(case)
    if reference:
        with lm.reference() as model:
            probs, logps = candidate_beliefs(model, lm, case, completions=completions)
    else:
        lm.model.train(False)
        probs, logps = candidate_beliefs(lm.model, lm, case, completions=completions, prefix=prefix)
    right = correct_index(case, names)
    return {"names": names, "probs": probs, "correct": right, "p_correct": probs[right],
            "top1": float(max(range(len(probs)), key=probs.__getitem__) == right), "completion_logps": logps}


@dataclass
class ProbeSet:
    """Cases scored after every update (see the module docstring)."""

    heldout: list[Case]
    max_taught: int = 6
    taught: list[Case] = field(default_factory=list)
    completions: dict[str, list[Trace]] = field(default_factory=dict)  # case id -> fixed traces (for the KL)

    def teach(self, case: Case, traces: list[Trace]) -> None:
        """A case was ranked: it joins the taught group (the first ``max_taught`` do),
        and its first ranked traces become its fixed KL completions."""
        if case.id in {c.id for c in self.taught} or len(self.taught) >= self.max_taught:
            return
        # one trace per case (the best ranked): the KL costs one short forward per taught case
        usable = [t for t in traces if t.completion_ids and t.ref_logps][:1]
        if not usable:
            return
        self.taught.append(case)
        self.completions[case.id] = usable

    def score(self, lm: LoadedModel) -> dict:
        """Probe metrics (TRL-style names, plain floats): ``probe/<group>_p_correct``,
        ``probe/<group>_top1`` for taught and held-out, ``probe/kl`` and ``probe/seconds``.
        Prompt passes are most of the probe's cost, so each case has one (its fixed
        completions are scored from its belief's pass) and the prefix every probe prompt
        shares (the system prompt) is computed once."""
        started = time.perf_counter()
        out: dict[str, float] = {}
        lm.model.train(False)
        prompts = {c.id: encode_prompt(lm.tokenizer, build_messages(c)) for c in self.taught + self.heldout}
        prefix = SharedPrefix.of(lm.model, lm, list(prompts.values()))
        scored: list[tuple[Trace, list[float]]] = []  # fixed completions and their log-probs now
        for group, cases in (("taught", self.taught), ("heldout", self.heldout)):
            if not cases:
                continue
            found = []
            for c in cases:
                fixed = self.completions.get(c.id, []) if group == "taught" else []
                prompt = prompts[c.id]
                shared = [t for t in fixed if t.prompt_ids == prompt]
                found.append(belief(lm, c, completions=shared, prefix=prefix))
                scored += zip(shared, found[-1]["completion_logps"])
                scored += [(t, policy_logps(lm, [t])[0]) for t in fixed if t.prompt_ids != prompt]  # e.g. hinted
            out[f"probe/{group}_p_correct"] = sum(b["p_correct"] for b in found) / len(found)
            out[f"probe/{group}_top1"] = sum(b["top1"] for b in found) / len(found)
        if scored:
            out["probe/kl"] = reference_kl([t.ref_logps for t, _ in scored], [now for _, now in scored],
                                           [t.loss_mask for t, _ in scored])
        out["probe/seconds"] = time.perf_counter() - started
        return out


def reference_kl(ref_logps: list[list[float]], logps: list[list[float]], loss_masks: list[list[int]]) -> float:
    """Mean k3 estimate of KL(reference || policy), nats per counted token, over completions
    sampled from the reference (or before training moved the policy).

    Args: per completion, its tokens' reference log-probs, policy log-probs and 0/1 loss mask
    (empty: every token counts; scaffold tokens we inserted count 0).
    """
    # the traces were sampled before training moved the policy (at v0: from the reference),
    # so the k3 estimator of KL(reference || policy) is the one that holds for them
    # (Schulman 2020, http://joschu.net/blog/kl-approx.html); KL(policy || reference)'s
    # k3 on them blows up on tokens the training pushed down
    total = weight = 0.0
    for ref, now, mask in zip(ref_logps, logps, loss_masks):
        n = len(now)
        m = torch.tensor(mask[:n] if mask else [1.0] * n, dtype=torch.float32)
        r = torch.tensor(ref[:n], dtype=torch.float32)
        total += float((k3_kl(r, torch.tensor(now, dtype=torch.float32)) * m).sum())
        weight += float(m.sum())
    return total / weight if weight else 0.0


def policy_logps(lm: LoadedModel, traces: list[Trace]) -> list[list[float]]:
    """Per-token log-probs of ``traces`` (sharing one prompt) under the policy, teacher-forced."""
    lm.model.train(False)
    batch = collate(traces[0].prompt_ids, [t.completion_ids for t in traces], lm.tokenizer.pad_token_id, lm.device,
                    loss_masks=[t.loss_mask for t in traces])
    with torch.no_grad(), onednn_linear(lm.model, enabled=lm.device.type == "cpu"):
        now = completion_logps(lm.model, batch)
    return [now[i, : len(t.completion_ids)].tolist() for i, t in enumerate(traces)]


def probe_kl(lm: LoadedModel, groups: list[list[Trace]]) -> float | None:
    """Mean k3 estimate of KL(reference || policy) (nats/token) over fixed completions, each group
    sharing one prompt, each forwarded with its prompt; None without completions."""
    traces = [t for ts in groups for t in ts]
    if not traces:
        return None
    logps = [lp for ts in groups for lp in policy_logps(lm, ts)]
    return reference_kl([t.ref_logps for t in traces], logps, [t.loss_mask for t in traces])
