"""Held-out evaluation: does the taught policy reason to the right diagnosis more
often than the reference, without becoming less safe?

For each case, ``samples`` traces are drawn freely (no hint, no rejection) from
the reference and from the policy with the same seeds, then checked by the
verifier (``verify.check_trace``) and the safety checker (``safety.check_safety``).
Reported per arm: the acceptance proportion with a Wilson 95% interval and the
mean safety score with a t interval; between arms: the difference in
acceptance with Newcombe's hybrid-score interval, Fisher's exact test and a
chi-square test (Yates-corrected) on the 2x2 table, and Welch's t-test on
safety scores. Traces of one case are not independent, so with few cases the
p-values are optimistic; the per-case table shows where a difference comes from.

``split_cases`` gives a deterministic held-out split by hashing case ids, so a
case stays on its side when cases are added to the library.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import time
from collections import Counter
from typing import Callable, Iterator, Sequence

from .clinical.cases import Case
from .rollout.generation import SamplingConfig, sample_traces
from .model.models import LoadedModel

Z95 = 1.959963984540054


# --------------------------------------------------------------------------- the split


def _unit_hash(case_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{case_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_cases(cases: Sequence[Case], heldout_fraction: float = 0.2, seed: int = 0) -> tuple[list[Case], list[Case]]:
    """(train, held-out), deciding each case by a hash of its id and ``seed``
    alone, so adding cases never moves an existing one across. When no case
    hashes below the fraction (tiny libraries), the lowest-hashing case is held
    out so the held-out side is never empty for a fraction > 0."""
    if not 0 <= heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be in [0, 1), got {heldout_fraction}")
    scores = {c.id: _unit_hash(c.id, seed) for c in cases}
    held = {c.id for c in cases if scores[c.id] < heldout_fraction}
    if not held and heldout_fraction > 0 and len(cases) >= 2:
        held = {min(scores, key=scores.get)}
    return [c for c in cases if c.id not in held], [c for c in cases if c.id in held]


# --------------------------------------------------------------------------- statistics


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n ((0, 1) when n == 0)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def newcombe_interval(k1: int, n1: int, k2: int, n2: int, z: float = Z95) -> tuple[float, float]:
    """Newcombe's hybrid score interval for p1 - p2 (method 10)."""
    if n1 == 0 or n2 == 0:
        return -1.0, 1.0
    p1, p2 = k1 / n1, k2 / n2
    l1, u1 = wilson_interval(k1, n1, z)
    l2, u2 = wilson_interval(k2, n2, z)
    d = p1 - p2
    lo = d - math.sqrt((p1 - l1) ** 2 + (u2 - p2) ** 2)
    hi = d + math.sqrt((u1 - p1) ** 2 + (p2 - l2) ** 2)
    return max(-1.0, lo), min(1.0, hi)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float | None, float | None, float | None]:
    """(mean, low, high) with a Student t interval; (None, None, None) when empty."""
    n = len(values)
    if n == 0:
        return None, None, None
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def two_proportion_tests(k1: int, n1: int, k2: int, n2: int) -> dict:
    """Fisher's exact test and the chi-square test on [[k1, n1-k1], [k2, n2-k2]]."""
    from scipy import stats

    table = [[k1, n1 - k1], [k2, n2 - k2]]
    odds_ratio, fisher_p = stats.fisher_exact(table)
    if min(k1 + k2, (n1 - k1) + (n2 - k2), n1, n2) == 0:
        chi2, chi2_p = 0.0, 1.0  # a zero margin: the proportions cannot differ
    else:
        chi2, chi2_p, _, _ = stats.chi2_contingency(table, correction=True)
    return {
        "table": table,
        "fisher_p": float(fisher_p),
        "odds_ratio": None if not math.isfinite(odds_ratio) else float(odds_ratio),
        "chi2": float(chi2),
        "chi2_p": float(chi2_p),
    }


def welch_p(a: Sequence[float], b: Sequence[float]) -> float | None:
    """Welch's t-test p-value (1.0 when both samples are constant and equal)."""
    if len(a) < 2 or len(b) < 2:
        return None
    from scipy import stats

    if len(set(a)) == 1 and len(set(b)) == 1:
        return 1.0 if a[0] == b[0] else 0.0
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


# --------------------------------------------------------------------------- sampling


@contextlib.contextmanager
def reference_view(lm: LoadedModel) -> Iterator[LoadedModel]:
    """A LoadedModel that samples from the frozen reference: with LoRA the same
    object with the adapter switched off; with full fine-tuning a shallow copy
    whose ``model`` is the reference copy."""
    if lm.lora is not None:
        with lm.model.disable_adapter():
            yield lm
    else:
        with lm.reference() as reference:
            yield dataclasses.replace(lm, model=reference)


def _sample_arm(lm: LoadedModel, case: Case, samples: int, settings: dict, seed: int, batch_size: int) -> list[dict]:
    from .rollout.sampler import annotate  # the sampler's own judgement: verifier, degenerate filter, safety

    out = []
    done = 0
    while done < samples:
        k = min(batch_size, samples - done)
        config = SamplingConfig(
            k=k, max_new_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
            top_p=settings["top_p"], seed=seed + done, conclusion=settings["conclusion"],
        )
        for trace in sample_traces(lm, case, config):
            annotate(trace, case)
            out.append(
                {
                    "case_id": case.id,
                    "text": trace.text,
                    "accepted": bool(trace.verdict["accepted"]),
                    "code": trace.verdict["code"],
                    "safety": float(trace.safety["score"]),
                }
            )
        done += k
    return out


def _arm_summary(rows: list[dict]) -> dict:
    n = len(rows)
    k = sum(r["accepted"] for r in rows)
    lo, hi = wilson_interval(k, n)
    safety = [r["safety"] for r in rows]
    mean, s_lo, s_hi = mean_interval(safety)
    return {
        "accepted": k,
        "n": n,
        "rate": k / n if n else None,
        "ci": [lo, hi],
        "safety_mean": mean,
        "safety_ci": [s_lo, s_hi],
        "verdicts": dict(Counter(r["code"] for r in rows)),
    }


def paired_tests(before: Sequence[float], after: Sequence[float]) -> dict:
    """Paired comparison of per-case values: mean change, how many rose, the Wilcoxon
    signed-rank test and the sign test (both two-sided; None where every pair is equal)."""
    from scipy import stats

    diffs = [a - b for a, b in zip(after, before)]
    nonzero = [d for d in diffs if d != 0]
    up = sum(d > 0 for d in diffs)
    return {"n": len(diffs), "improved": up, "mean_before": sum(before) / len(before) if before else None,
            "mean_after": sum(after) / len(after) if after else None,
            "mean_change": sum(diffs) / len(diffs) if diffs else None,
            "wilcoxon_p": float(stats.wilcoxon(nonzero).pvalue) if nonzero else None,
            "sign_test_p": float(stats.binomtest(up, len(nonzero)).pvalue) if nonzero else None}


def likelihood_comparison(lm: LoadedModel, cases: Sequence[Case]) -> dict:
    """The probe-style A/B: per case, the probability reference and policy give the correct
    diagnosis when asked to conclude (``belief.belief``: teacher-forced, no sampling noise),
    compared pairwise over the cases. Detects changes far smaller than sampled acceptance can."""
    from .belief import beliefs

    started = time.perf_counter()
    cases = list(cases)
    rows = [{"case_id": case.id, "reference": ref["p_correct"], "policy": pol["p_correct"],
             "reference_top1": ref["top1"], "policy_top1": pol["top1"]}
            for case, ref, pol in zip(cases, beliefs(lm, cases, reference=True), beliefs(lm, cases))]
    return {"p_correct": paired_tests([r["reference"] for r in rows], [r["policy"] for r in rows]),
            "top1": {"reference": sum(r["reference_top1"] for r in rows), "policy": sum(r["policy_top1"] for r in rows),
                     "n": len(rows)},
            "per_case": rows, "seconds": time.perf_counter() - started}


def compare_policies(
    engine,
    cases: Sequence[Case],
    samples: int = 8,
    *,
    max_new_tokens: int = 192,
    temperature: float = 0.8,
    top_p: float = 0.95,
    seed: int = 0,
    batch_size: int = 8,
    keep_texts: bool = False,
    on_progress: Callable[[dict], None] | None = None,
    conclusion: str = SamplingConfig.conclusion,
) -> dict:
    """A/B of reference vs current policy on ``cases`` (the UI's A/B panel and the
    ``evaluate`` command). ``engine`` is an Engine (its lock is held throughout,
    so no update changes the policy mid-way) or a LoadedModel. ``on_progress``
    gets {"done", "total", "case_id", "arm"} after each case and arm.
    Returns the result dict (see ``format_table`` for its shape in words)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not cases:
        raise ValueError("no cases to evaluate")
    if not 1 <= batch_size <= 64:
        raise ValueError(f"batch_size must be between 1 and 64, got {batch_size}")
    settings = {"max_new_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "conclusion": conclusion}
    SamplingConfig(k=1, **settings)  # validate early
    lm: LoadedModel = engine.lm if hasattr(engine, "lm") else engine
    lock = getattr(engine, "lock", None) or contextlib.nullcontext()
    started = time.perf_counter()
    rows: dict[str, list[dict]] = {"reference": [], "policy": []}
    total = 2 * len(cases)
    done = 0
    with lock:
        version = getattr(engine, "version", None)
        for i, case in enumerate(cases):
            case_seed = seed * 1_000_003 + i * 1000
            for arm in ("reference", "policy"):
                if arm == "reference":
                    with reference_view(lm) as ref_lm:
                        found = _sample_arm(ref_lm, case, samples, settings, case_seed, batch_size)
                else:
                    found = _sample_arm(lm, case, samples, settings, case_seed, batch_size)
                rows[arm].extend(found)
                done += 1
                if on_progress is not None:
                    on_progress({"done": done, "total": total, "case_id": case.id, "arm": arm})
        likelihood = likelihood_comparison(lm, cases)
    ref, pol = _arm_summary(rows["reference"]), _arm_summary(rows["policy"])
    tests = two_proportion_tests(pol["accepted"], pol["n"], ref["accepted"], ref["n"])
    per_case = []
    for case in cases:
        entry = {"case_id": case.id}
        for arm in ("reference", "policy"):
            mine = [r for r in rows[arm] if r["case_id"] == case.id]
            entry[arm] = {
                "accepted": sum(r["accepted"] for r in mine),
                "n": len(mine),
                "safety_mean": sum(r["safety"] for r in mine) / len(mine) if mine else None,
            }
        per_case.append(entry)
    result = {
        "model": lm.name,
        "mode": "lora" if lm.lora is not None else "full",
        "policy_version": version,
        "cases": [c.id for c in cases],
        "samples_per_case": samples,
        "settings": {**settings, "seed": seed},
        "reference": ref,
        "policy": pol,
        "difference": {
            "rate": (pol["rate"] - ref["rate"]) if pol["n"] and ref["n"] else None,
            "ci": list(newcombe_interval(pol["accepted"], pol["n"], ref["accepted"], ref["n"])),
            "safety": (pol["safety_mean"] - ref["safety_mean"]) if pol["n"] and ref["n"] else None,
        },
        "tests": {**tests, "safety_welch_p": welch_p([r["safety"] for r in rows["policy"]], [r["safety"] for r in rows["reference"]])},
        "per_case": per_case,
        "likelihood": likelihood,
        "seconds": time.perf_counter() - started,
    }
    if keep_texts:
        result["traces"] = rows
    return result


def heldout_comparison(engine, cases: Sequence[Case] | None = None, samples: int = 4, heldout_fraction: float = 0.2, split_seed: int = 0, **kwargs) -> dict:
    """The UI's A/B panel: ``compare_policies`` on the held-out split of ``cases``
    (default: the bundled case library)."""
    if cases is None:
        from .library import library_or_builtin

        cases = library_or_builtin()
    _, heldout = split_cases(cases, heldout_fraction, split_seed)
    result = compare_policies(engine, heldout, samples, **kwargs)
    result["split"] = {"heldout_fraction": heldout_fraction, "seed": split_seed, "heldout": len(heldout), "total": len(cases)}
    return result


# --------------------------------------------------------------------------- reporting


def _pct(x: float | None) -> str:
    return "   n/a" if x is None else f"{100 * x:5.1f}%"


def _num(x: float | None, fmt: str = "{:.3f}") -> str:
    return "n/a" if x is None else fmt.format(x)


def format_table(result: dict) -> str:
    """The comparison as a fixed-width text table."""
    lines = [
        f"model {result['model']} ({result['mode']}), policy version {result['policy_version']}, "
        f"{len(result['cases'])} case(s) x {result['samples_per_case']} sample(s) per arm",
        "",
        f"{'arm':<10} {'accepted':>9} {'rate':>7}  {'95% CI':<17} {'safety':>7}  {'95% CI':<15}",
    ]
    for arm in ("reference", "policy"):
        a = result[arm]
        ci = f"[{_pct(a['ci'][0])}, {_pct(a['ci'][1])}]"
        sci = f"[{_num(a['safety_ci'][0])}, {_num(a['safety_ci'][1])}]"
        lines.append(
            f"{arm:<10} {a['accepted']:>4}/{a['n']:<4} {_pct(a['rate']):>7}  {ci:<17} {_num(a['safety_mean']):>7}  {sci:<15}"
        )
    d, t = result["difference"], result["tests"]
    diff = "n/a" if d["rate"] is None else f"{100 * d['rate']:+.1f} points"
    lines += [
        "",
        f"difference (policy - reference): {diff}, 95% CI [{100 * d['ci'][0]:+.1f}, {100 * d['ci'][1]:+.1f}]; "
        f"safety {_num(d['safety'], '{:+.3f}')}",
        f"Fisher exact p = {t['fisher_p']:.4g}; chi-square = {t['chi2']:.3f}, p = {t['chi2_p']:.4g}; "
        f"safety Welch p = {_num(t['safety_welch_p'], '{:.4g}')}",
    ]
    like = result.get("likelihood")
    if like:
        p, top = like["p_correct"], like["top1"]
        lines += ["", f"P(correct diagnosis), teacher-forced, paired over {p['n']} case(s): "
                      f"reference {_num(p['mean_before'])} -> policy {_num(p['mean_after'])} "
                      f"(higher in {p['improved']}/{p['n']}); Wilcoxon p = {_num(p['wilcoxon_p'], '{:.4g}')}, "
                      f"sign test p = {_num(p['sign_test_p'], '{:.4g}')}; top-1 {top['reference']:g} -> {top['policy']:g} of {top['n']}"]
    if len(result["per_case"]) > 1:
        lines += ["", f"{'case':<32} {'reference':>10} {'policy':>10}"]
        for c in result["per_case"]:
            r, p = c["reference"], c["policy"]
            lines.append(f"{c['case_id'][:32]:<32} {r['accepted']:>4}/{r['n']:<5} {p['accepted']:>4}/{p['n']:<5}")
    return "\n".join(lines)


def write_json(result: dict, path) -> None:
    """Write the result to ``path`` as indented JSON."""
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=2)
        fh.write("\n")
