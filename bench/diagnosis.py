"""README's diagnosis table: un-hinted acceptance of the default model over the library.

    python -m bench.diagnosis            # re-measure the current code (~30 min on 2 cores), rewrite README
    python -m bench.diagnosis --no-run   # rewrite README from the stored reports only

The reports are ``python -m rlhf_core diagnose`` JSON files in bench/diagnosis/:
``before.json`` was measured on the code before the conclusion step, ``independent.json``
on the constrained conclusion with each row's conclusion drawn independently (the default
until arithmetic draws; ``diagnose --conclusion-draw independent`` reproduces it), both kept
as the records they are; ``after.json`` is the current code, re-measured by this script.
"""
from __future__ import annotations

import argparse
import json
import subprocess
from collections import Counter
import sys
from pathlib import Path

from .common import write_readme_block

ROOT = Path(__file__).resolve().parents[1]
REPORTS = ROOT / "bench" / "diagnosis"
BEGIN, END = "<!-- BEGIN diagnosis results -->", "<!-- END diagnosis results -->"
LABELS = {"before": "before (free text, old prompt)",
          "independent": "constrained conclusion, independent draws",
          "after": "now (constrained conclusion, arithmetic draws: default settings)"}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def _with_expected(observed: float, expected: float | None) -> str:
    return _pct(observed) if expected is None else f"{_pct(observed)}, expected {_pct(expected)}"


def _cut_at_budget(report: dict) -> str:
    """Share of traces whose label was inserted at the hard reasoning budget (mid-sentence);
    "-" where the report's traces had no constrained conclusion."""
    triggers = Counter()
    for case in report["cases"]:
        triggers.update(case.get("conclusion_triggers") or {})
    if set(triggers) <= {"none"}:
        return "-"
    return _pct(triggers.get("budget", 0) / report["overall"]["sampled"])


def _changing_mind(overall: dict) -> str:
    """Accepted traces whose reasoning first concluded another candidate; "-" for a
    report made before the verifier looked for them."""
    if "accepted_changing_mind" not in overall:
        return "-"
    n, of = overall["accepted_changing_mind"], overall["accepted"]
    return f"{n}/{of} ({_pct(n / of if of else 0.0)})"


def table(reports: dict[str, dict]) -> str:
    first = next(iter(reports.values()))["settings"]
    rows = [
        f"Model `{first['model']}`, {first['samples']} un-hinted samples per case, temperature "
        f"{first['temperature']}, seed {first['seed']}, the whole bundled library. *Expected*: the same "
        "outcome averaged over the constrained conclusion's draw, given the reasoning each trace sampled "
        "(each trace counts the model's probability of the correct candidate when it concluded, if its "
        "reasoning passes the filters with that conclusion): what re-drawing only the conclusions would "
        "give on average, with less sampling noise than the one draw observed. With arithmetic draws the "
        "chance of at least one accepted trace in a case re-draws the batch's one shared offset, so it is "
        "the share of offsets that put at least one row's code on its correct candidate.",
        "",
        "| code | cases | accepted (all) | multiple choice | free text | concluded | cases with >= 1 accepted | "
        "accepted, reasoning first concluded another candidate | main rejection reasons | cut at the hard budget | "
        "tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in reports.items():
        o, mc, ft = r["overall"], r["multiple_choice"], r["free_text"]
        reasons = ", ".join(f"{k} {v}" for k, v in list(o["rejected_by_reason"].items())[:3])
        tokens = r["settings"].get("max_new_tokens")
        rows.append(
            f"| {LABELS.get(name, name)}, {tokens} tokens | {o['cases']} | {o['accepted']}/{o['sampled']} "
            f"({_with_expected(o['acceptance'], o.get('expected_acceptance'))}) | {_pct(mc['acceptance'])} | "
            f"{_pct(ft['acceptance'])} | {_pct(o['concluded'])} | "
            f"{_with_expected(o['cases_with_an_accepted_trace'], o.get('expected_cases_with_an_accepted_trace'))} | "
            f"{_changing_mind(o)} | {reasons} | {_cut_at_budget(r)} | "
            f"{r['tokens_per_second']:.0f} |"
        )
    return "\n".join(rows)


def write_readme(text: str) -> None:
    write_readme_block(text, BEGIN, END)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--no-run", action="store_true", help="do not re-measure; use the stored reports")
    parser.add_argument("--model", default="smollm2-135m")
    args = parser.parse_args(argv)
    if not args.no_run:
        subprocess.run([sys.executable, "-m", "rlhf_core", "diagnose", "--model", args.model, "--summary",
                        "--json-out", str(REPORTS / "after.json")], check=True, cwd=ROOT)
    reports = {name: json.loads((REPORTS / f"{name}.json").read_text()) for name in LABELS
               if (REPORTS / f"{name}.json").exists()}
    text = table(reports)
    print(text)
    write_readme(text)


if __name__ == "__main__":
    main()
