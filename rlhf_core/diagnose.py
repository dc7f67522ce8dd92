"""The diagnosis report: how often does the model conclude each case correctly on its own?

``diagnose`` draws un-hinted samples per case (no rationalisation, no
rejection loop), runs the verifier and the degenerate-trace filter on each,
and counts acceptances and rejection reasons per case and overall, with
multiple-choice and free-text cases apart. ``python -m rlhf_core diagnose``
prints it as a table and writes it as JSON.
"""
from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Callable, Sequence

from .clinical.cases import Case
from .rollout.generation import SamplingConfig, sample_traces
from .model.models import LoadedModel
from .rollout.sampler import annotate, changed_mind, judge
from .clinical.verify import check_trace


def _correct_candidate(case: Case, names: list[str]) -> int | None:
    """Index of the one candidate the verifier accepts as the case's answer."""
    right = [i for i, name in enumerate(names) if check_trace(f"Final diagnosis: {name}", case).accepted]
    return right[0] if len(right) == 1 else None


def _belief_at_conclusion(case: Case, traces) -> float | None:
    """Mean probability the model gave the correct candidate when it concluded
    (``Trace.conclusion["probabilities"]``), over the constrained traces."""
    values = []
    for t in traces:
        c = t.conclusion or {}
        probs, names = c.get("probabilities"), c.get("candidates")
        if probs and names:
            right = _correct_candidate(case, names)
            if right is not None:
                values.append(probs[right])
    return sum(values) / len(values) if values else None


def _accepting_share(case: Case, trace) -> tuple[float, float]:
    """(low, width): the part [low, low + width) of [0, 1) where ``trace``'s conclusion draw
    would have picked the correct candidate, given the reasoning it sampled: its interval of the
    model's CDF over the candidates (in their order), if the trace would pass the verifier and
    the degenerate filter with that conclusion in place of the one drawn; empty (0, 0)
    otherwise. Its width is the trace's chance of being accepted over the draw alone. A trace
    whose conclusion was not drawn from the candidates (free mode) counts what happened: all of
    it accepted, or none."""
    c = trace.conclusion or {}
    probs, names, chosen = c.get("probabilities"), c.get("candidates"), c.get("chosen_text")
    right = _correct_candidate(case, names) if probs and names and chosen else None
    at = trace.text.rfind(chosen) if right is not None else -1
    if at < 0:
        return 0.0, float(bool(trace.verdict["accepted"]))
    concluded_right = trace.text[:at] + names[right] + trace.text[at + len(chosen):]
    if not judge(concluded_right, case, hinted=trace.rationalised)["accepted"]:
        return 0.0, 0.0
    return sum(probs[:right]), probs[right]


def _chance_of_an_accepted_trace(chances: list[float]) -> float:
    """P(at least one accepted) for independent draws with these chances."""
    none = 1.0
    for q in chances:
        none *= 1.0 - q
    return 1.0 - none


def _chance_with_codes(shares: list[tuple[float, float]], codes: list[float]) -> float:
    """P(at least one accepted) when the batch drew at ``codes`` (``arithmetic_codes``: one
    random offset shared by every row): the share of offsets that move at least one row's
    code into its accepting share (low, width), i.e. the length of the union of the arcs
    [low - code, low - code + width) on the circle [0, 1)."""
    arcs = []
    for (low, width), code in zip(shares, codes):
        if width >= 1.0:
            return 1.0
        if width > 0:
            start = (low - code) % 1.0
            end = start + width
            arcs += [(start, min(end, 1.0))] + ([(0.0, end - 1.0)] if end > 1.0 else [])
    covered, reach = 0.0, 0.0
    for start, end in sorted(arcs):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def _chance_of_an_accepted_trace_in(shares: list[tuple[float, float]], codes: list[float | None]) -> float:
    """P(at least one of a batch's traces accepted) over the conclusion draws alone, from their
    accepting shares (``_accepting_share``) and recorded codes: at evenly spread codes
    (arithmetic draws) or, where a code is missing, independently."""
    if shares and all(code is not None for code in codes):
        return _chance_with_codes(shares, codes)
    return _chance_of_an_accepted_trace([width for _, width in shares])


def _case_row(case: Case, traces, with_traces: bool = False) -> dict:
    reasons = Counter(t.verdict["code"] for t in traces if not t.verdict["accepted"])
    conclusions = Counter((getattr(t, "conclusion", None) or {}).get("trigger", "none") for t in traces)
    accepted = sum(bool(t.verdict["accepted"]) for t in traces)
    judged = sum(t.verdict["code"] not in ("no_conclusion", "empty") for t in traces)
    shares = [_accepting_share(case, t) for t in traces]  # each runs the verifier once
    return {
        "case_id": case.id,
        "kind": "multiple_choice" if case.is_multiple_choice else "free_text",
        "sampled": len(traces),
        "accepted": accepted,
        # accepted, but the reasoning first concluded another candidate (the card warns)
        "accepted_changing_mind": sum(bool(t.verdict.get("accepted")) and changed_mind(t.verdict)
                                      for t in traces),
        "concluded": judged,
        "tokens": sum(len(t.completion_ids) for t in traces),
        "rejected_by_reason": dict(reasons),
        "conclusion_triggers": dict(conclusions),
        "belief_at_conclusion": _belief_at_conclusion(case, traces),
        # the same outcome in expectation over the conclusion draws (the reasoning as sampled):
        # what a re-draw of the conclusions would give on average, with less sampling noise
        "expected_accepted": sum(width for _, width in shares),
        "chance_of_an_accepted_trace": _chance_of_an_accepted_trace_in(
            shares, [(t.conclusion or {}).get("code") for t in traces]),
        **({"traces": [
            {"text": t.text, "completion_ids": t.completion_ids, "loss_mask": t.loss_mask, "verdict": t.verdict,
             "conclusion": t.conclusion, "finish_reason": t.finish_reason}
            for t in traces
        ]} if with_traces else {}),
    }


def _summary(rows: list[dict]) -> dict:
    sampled = sum(r["sampled"] for r in rows)
    reasons: Counter = Counter()
    for r in rows:
        reasons.update(r["rejected_by_reason"])
    beliefs = [r["belief_at_conclusion"] for r in rows if r["belief_at_conclusion"] is not None]
    return {
        "cases": len(rows),
        "sampled": sampled,
        "belief_at_conclusion": sum(beliefs) / len(beliefs) if beliefs else None,
        "accepted": sum(r["accepted"] for r in rows),
        "acceptance": sum(r["accepted"] for r in rows) / sampled if sampled else 0.0,
        "accepted_changing_mind": sum(r.get("accepted_changing_mind", 0) for r in rows),
        "concluded": sum(r["concluded"] for r in rows) / sampled if sampled else 0.0,
        "cases_with_an_accepted_trace": sum(r["accepted"] > 0 for r in rows) / len(rows) if rows else 0.0,
        "expected_acceptance": sum(r["expected_accepted"] for r in rows) / sampled if sampled else 0.0,
        "expected_cases_with_an_accepted_trace": (sum(r["chance_of_an_accepted_trace"] for r in rows) / len(rows)
                                                  if rows else 0.0),
        "rejected_by_reason": dict(reasons.most_common()),
    }


def diagnose(
    lm: LoadedModel,
    cases: Sequence[Case],
    samples: int = 8,
    sampling: SamplingConfig | None = None,
    seed: int = 1,
    on_case: Callable[[dict], None] | None = None,
    with_traces: bool = False,
) -> dict:
    """Un-hinted acceptance of ``lm`` on ``cases``: ``samples`` traces per case,
    decoded in one batch with ``sampling`` (its ``k`` and ``seed`` are replaced).
    Returns {"settings", "cases": [row per case], "overall", "multiple_choice",
    "free_text", "seconds", "tokens_per_second"}; ``with_traces`` keeps each
    case's traces (text, tokens, verdict, conclusion) in its row."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not cases:
        raise ValueError("no cases to diagnose")
    base = sampling or SamplingConfig()
    started = time.perf_counter()
    rows = []
    for i, case in enumerate(cases):
        config = SamplingConfig(**{**asdict(base), "k": samples, "seed": seed + i})
        # nothing is trained on these traces: their reference log-probs are not needed
        traces = [annotate(t, case) for t in sample_traces(lm, case, config, reference_is_policy=True)]
        row = _case_row(case, traces, with_traces)
        rows.append(row)
        if on_case is not None:
            on_case(row)
    seconds = time.perf_counter() - started
    return {
        "settings": {**asdict(base), "model": lm.name, "samples": samples, "seed": seed},
        "cases": rows,
        "overall": _summary(rows),
        "multiple_choice": _summary([r for r in rows if r["kind"] == "multiple_choice"]),
        "free_text": _summary([r for r in rows if r["kind"] == "free_text"]),
        "seconds": seconds,
        "tokens_per_second": sum(r["tokens"] for r in rows) / seconds if seconds else 0.0,
    }


def _pct(x: float) -> str:
    return f"{100 * x:5.1f}%"


def format_report(report: dict, per_case: bool = True) -> str:
    """The report as a plain-text table: one line per case, then the totals."""
    lines = []
    if per_case:
        lines.append(f"{'case':<18} {'kind':<4} {'accepted':>9} {'concluded':>9}  rejected by reason")
        for r in report["cases"]:
            reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["rejected_by_reason"].items(), key=lambda kv: -kv[1]))
            kind = "mc" if r["kind"] == "multiple_choice" else "free"
            lines.append(
                f"{r['case_id']:<18} {kind:<4} {r['accepted']:>4}/{r['sampled']:<4} {r['concluded']:>4}/{r['sampled']:<4}  {reasons}"
            )
        lines.append("")
    lines.append(f"{'':<16} {'cases':>5} {'accepted':>14} {'concluded':>9} {'cases >=1 ok':>12} {'belief':>7}")
    for name in ("overall", "multiple_choice", "free_text"):
        s = report[name]
        if not s["cases"]:
            continue
        belief = _pct(s["belief_at_conclusion"]) if s["belief_at_conclusion"] is not None else "     -"
        lines.append(
            f"{name:<16} {s['cases']:>5} {s['accepted']:>5}/{s['sampled']:<4} {_pct(s['acceptance'])} "
            f"{_pct(s['concluded']):>9} {_pct(s['cases_with_an_accepted_trace']):>12} {belief:>7}"
        )
    lines.append("belief: the model's probability of the correct conclusion when it concluded (constrained traces)")
    o = report["overall"]
    if "expected_acceptance" in o:
        lines.append(f"expected over the conclusion draws (the reasoning as sampled): acceptance "
                     f"{_pct(o['expected_acceptance']).strip()}, cases >=1 ok "
                     f"{_pct(o['expected_cases_with_an_accepted_trace']).strip()}")
    if o.get("accepted"):
        lines.append(f"accepted, but the reasoning first concluded another candidate: "
                     f"{o.get('accepted_changing_mind', 0)}/{o['accepted']} (the conclusion stands; the card warns)")
    reasons = report["overall"]["rejected_by_reason"]
    if reasons:
        lines.append("rejections: " + ", ".join(f"{k} {v}" for k, v in reasons.items()))
    lines.append(f"{report['seconds']:.0f} s, {report['tokens_per_second']:.0f} tokens/s")
    return "\n".join(lines)


def write_report(report: dict, path: str | Path) -> None:
    """Write the report to ``path`` as indented JSON."""
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
