"""What the model believes about a case, and a probe set that tracks it per update.

*Belief*: the probability the model gives each candidate conclusion (the
answer and the distractors, or the options) when asked to conclude right
after the case prompt: ``<prompt> Final diagnosis: <candidate><eos>`` scored
by teacher forcing, per token (as the constrained conclusion step scores them),
normalised over the candidates. One forward of the prompts, then every case's C
short continuations in one forward sharing their key/value caches, batched over
cases (a probe set of six is four forwards). Deterministic: no sampling noise,
so a change between versions is the update's doing.

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

import contextlib
import time
from dataclasses import dataclass, field

import torch

from .clinical.cases import Case
from .rollout.conclusion import SCAFFOLD_TEXT, candidate_probs, candidate_scores, candidates
from .model.cpu_linear import onednn_linear
from .model.folded import folded_adapters
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


CASES_PER_PASS = 8  # cases scored in one batched forward: bounds its padded batch


def _common_prefix(prompts: list[list[int]]) -> int:
    """Length of the tokens every prompt starts with (the system prompt: ~40% of a SmolLM2
    probe prompt), leaving each prompt at least one token of its own; 0 for a single prompt."""
    if len(prompts) < 2:
        return 0
    n, shortest = 0, min(len(p) for p in prompts)
    while n < shortest - 1 and all(p[n] == prompts[0][n] for p in prompts):
        n += 1
    return n


def _prompt_rows(model, lm: LoadedModel, prompts: list[list[int]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every layer's keys and values of each prompt, one row per prompt ([R, kv_heads,
    longest prompt, head_dim]; a shorter prompt's row is right-padded, its padding seen
    by none of its tokens): the shared prefix in one forward, the rest of every prompt
    after it in another."""
    from transformers import DynamicCache

    device, pad = lm.device, lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    shared, cache = _common_prefix(prompts), None
    if shared:
        prefix = model(input_ids=torch.tensor([prompts[0][:shared]], device=device), use_cache=True, logits_to_keep=1)
        cache = DynamicCache()
        for index, layer in enumerate(prefix.past_key_values.layers):
            cache.update(layer.keys.expand(len(prompts), -1, -1, -1), layer.values.expand(len(prompts), -1, -1, -1),
                         index)
    width = max(len(p) for p in prompts) - shared
    rest = torch.tensor([p[shared:] + [pad] * (width - len(p) + shared) for p in prompts], device=device)
    positions = shared + torch.arange(width, device=device)
    out = model(input_ids=rest, past_key_values=cache, use_cache=True, logits_to_keep=1,
                position_ids=positions[None].expand(len(prompts), -1), cache_position=positions)
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


def case_beliefs(model, lm: LoadedModel, cases: list[Case], completions: list[list[Trace]] | None = None,
                 how: str = "per_token") -> list[tuple[list[float], list[list[float]]]]:
    """Per case: P(candidate) for each of ``candidates(case)`` under ``model`` (the
    policy, or the reference from ``lm.reference()``), and the teacher-forced per-token
    log-probs of ``completions[i]`` (traces of that case's prompt). Batched over the
    cases, CASES_PER_PASS at a time: the prompts (their shared prefix once), every case's
    conclusion line after its prompt (the scaffold, then each candidate: ``score_branches``)
    and the completions are three or four forwards however many cases there are."""
    out = []
    for start in range(0, len(cases), CASES_PER_PASS):
        chunk = slice(start, start + CASES_PER_PASS)
        out += _chunk_beliefs(model, lm, cases[chunk], (completions or [[] for _ in cases])[chunk], how)
    return out


def _chunk_beliefs(model, lm: LoadedModel, cases: list[Case], completions: list[list[Trace]], how: str):
    prompts = [encode_prompt(lm.tokenizer, build_messages(c)) for c in cases]
    for case, prompt, traces in zip(cases, prompts, completions):
        if any(t.prompt_ids != prompt for t in traces):
            raise ValueError(f"completions of case {case.id!r} must continue its prompt")
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else 0
    with onednn_linear(model, enabled=lm.device.type == "cpu"):  # oneDNN where it beats MKL here (cpu_linear.py)
        kv = _prompt_rows(model, lm, prompts)
        ends = [len(p) - 1 for p in prompts]  # each prompt's last token is re-fed: its logits predict what follows
        conclusions = score_branches(model, kv, ends, [[p[-1], *_scaffold(lm)] for p in prompts],
                                     [_branches(lm, candidates(c)) for c in cases], pad)
        logps: list[list[list[float]]] = [[] for _ in cases]
        rows = [r for r, traces in enumerate(completions) if traces]
        if rows:
            index = torch.tensor(rows, device=lm.device)
            scored = score_branches(model, [(k.index_select(0, index), v.index_select(0, index)) for k, v in kv],
                                    [ends[r] for r in rows], [[prompts[r][-1]] for r in rows],
                                    [[t.completion_ids for t in completions[r]] for r in rows], pad)
            for r, (_, per_trace) in zip(rows, scored):
                logps[r] = per_trace
    return [(candidate_probs(candidate_scores(per_candidate, how)), logps[r])
            for r, (_, per_candidate) in enumerate(conclusions)]


def beliefs(lm: LoadedModel, cases: list[Case], reference: bool = False,
            completions: list[list[Trace]] | None = None) -> list[dict]:
    """``belief`` of each case, batched (``case_beliefs``), LoRA adapters folded."""
    if not cases:
        return []
    if reference:
        context = lm.reference()
    else:
        lm.model.train(False)
        context = contextlib.nullcontext(lm.model)
    with context as model, folded_adapters(model), torch.no_grad():
        scored = case_beliefs(model, lm, cases, completions)
    found = []
    for case, (probs, logps) in zip(cases, scored):
        names = candidates(case)
        right = correct_index(case, names)
        found.append({"names": names, "probs": probs, "correct": right, "p_correct": probs[right],
                      "top1": float(max(range(len(probs)), key=probs.__getitem__) == right), "completion_logps": logps})
    return found


def belief(lm: LoadedModel, case: Case, reference: bool = False, completions: list[Trace] = ()) -> dict:
    """{"names", "probs", "correct", "p_correct", "top1", "completion_logps"} for one case
    (``completion_logps``: per-token log-probs of ``completions``, see ``case_beliefs``)."""
    return beliefs(lm, [case], reference, [list(completions)])[0]


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
        Every case is scored in one batch (``beliefs``): the prompts, the conclusion
        lines and the fixed completions are three or four forwards in all, not three per case."""
        started = time.perf_counter()
        out: dict[str, float] = {}
        cases = self.taught + self.heldout
        prompts = [encode_prompt(lm.tokenizer, build_messages(c)) for c in cases]
        fixed = [self.completions.get(c.id, []) if i < len(self.taught) else [] for i, c in enumerate(cases)]
        shared = [[t for t in traces if t.prompt_ids == prompt] for traces, prompt in zip(fixed, prompts)]
        found = beliefs(lm, cases, completions=shared)
        scored: list[tuple[Trace, list[float]]] = []  # fixed completions and their log-probs now
        for traces, own, b in zip(fixed, shared, found):
            scored += zip(own, b["completion_logps"])
            # a trace of another prompt (e.g. hinted) gets its own forward
            scored += [(t, policy_logps(lm, [t])[0]) for t in traces if all(t is not o for o in own)]
        for group, part in (("taught", found[: len(self.taught)]), ("heldout", found[len(self.taught):])):
            if part:
                out[f"probe/{group}_p_correct"] = sum(b["p_correct"] for b in part) / len(part)
                out[f"probe/{group}_top1"] = sum(b["top1"] for b in part) / len(part)
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
