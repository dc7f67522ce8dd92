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
from .rollout.decoding import score_continuations
from .rollout.records import Trace
from .rollout.logprobs import collate, completion_logps
from .training.losses import k3_kl, masked_mean
from .model.models import LoadedModel
from .rollout.prompts import build_messages, encode_prompt


def correct_index(case: Case, names: list[str]) -> int:
    """Which candidate is the right one (``candidates`` shuffles free-text names)."""
    if case.options:
        return int(case.answer_idx)
    key = " ".join(case.answer.lower().split())
    return next(i for i, n in enumerate(names) if " ".join(n.lower().split()) == key)


def _continuations(lm: LoadedModel, names: list[str]) -> list[list[int]]:
    tok = lm.tokenizer
    end = tok.eos_token_id
    scaffold = tok.encode("\n" + SCAFFOLD_TEXT, add_special_tokens=False)
    return [scaffold + tok.encode(" " + n, add_special_tokens=False) + ([end] if end is not None else []) for n in names]


def candidate_beliefs(model, lm: LoadedModel, case: Case, how: str = "per_token") -> list[float]:
    """P(candidate) for each of ``candidates(case)`` under ``model`` (the policy, or
    the reference from ``lm.reference()``)."""
    names = candidates(case)
    prompt = encode_prompt(lm.tokenizer, build_messages(case))
    sequences = _continuations(lm, names)
    scaffold_len = len(lm.tokenizer.encode("\n" + SCAFFOLD_TEXT, add_special_tokens=False))
    device = lm.device
    with torch.no_grad(), onednn_linear(model, enabled=device.type == "cpu"):  # ~2x MKL on AMD (cpu_linear.py)
        out = model(input_ids=torch.tensor([prompt], device=device), use_cache=True, logits_to_keep=1)
    kv = [(layer.keys, layer.values) for layer in out.past_key_values.layers]
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    scored = score_continuations(model, kv, 0, len(prompt) - 1, [[prompt[-1], *s] for s in sequences], pad)
    return candidate_probs(candidate_scores([lps[scaffold_len:] for lps in scored], how))


def belief(lm: LoadedModel, case: Case, reference: bool = False) -> dict:
    """{"names", "probs", "correct", "p_correct", "top1"} for one case."""
    names = candidates(case)
    if reference:
        with lm.reference() as model:
            probs = candidate_beliefs(model, lm, case)
    else:
        lm.model.train(False)
        probs = candidate_beliefs(lm.model, lm, case)
    right = correct_index(case, names)
    return {"names": names, "probs": probs, "correct": right, "p_correct": probs[right],
            "top1": float(max(range(len(probs)), key=probs.__getitem__) == right)}


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
        ``probe/<group>_top1`` for taught and held-out, ``probe/kl`` and ``probe/seconds``."""
        started = time.perf_counter()
        out: dict[str, float] = {}
        for group, cases in (("taught", self.taught), ("heldout", self.heldout)):
            if not cases:
                continue
            found = [belief(lm, c) for c in cases]
            out[f"probe/{group}_p_correct"] = sum(b["p_correct"] for b in found) / len(found)
            out[f"probe/{group}_top1"] = sum(b["top1"] for b in found) / len(found)
        kl = probe_kl(lm, [ts for ts in self.completions.values()])
        if kl is not None:
            out["probe/kl"] = kl
        out["probe/seconds"] = time.perf_counter() - started
        return out


def probe_kl(lm: LoadedModel, groups: list[list[Trace]]) -> float | None:
    """Mean k3 estimate of KL(reference || policy) (nats/token) over fixed completions, each group
    sharing one prompt; None without completions."""
    total = weight = 0.0
    lm.model.train(False)
    for traces in groups:
        batch = collate(traces[0].prompt_ids, [t.completion_ids for t in traces], lm.tokenizer.pad_token_id, lm.device,
                        loss_masks=[t.loss_mask for t in traces])
        t = batch.completion_ids.shape[1]
        ref = torch.zeros((len(traces), t))
        for i, tr in enumerate(traces):
            ref[i, : len(tr.ref_logps)] = torch.tensor(tr.ref_logps)
        with torch.no_grad(), onednn_linear(lm.model, enabled=lm.device.type == "cpu"):
            now = completion_logps(lm.model, batch)
        mask = batch.completion_mask
        n = float(mask.sum())
        # the traces were sampled before training moved the policy (at v0: from the reference),
        # so the k3 estimator of KL(reference || policy) is the one that holds for them
        # (Schulman 2020, http://joschu.net/blog/kl-approx.html); KL(policy || reference)'s
        # k3 on them blows up on tokens the training pushed down
        total += float(masked_mean(k3_kl(ref.to(now.device) * mask, now * mask), mask)) * n
        weight += n
    return total / weight if weight else None
