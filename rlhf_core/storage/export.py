"""Getting rankings out of (and back into) the database.

Formats written by ``export`` (JSON lines, one object per line):

``trl``        every ranked pair in TRL's *conversational preference* format:
               ``{"prompt": [system, user messages], "chosen": [{"role": "assistant",
               "content": ...}], "rejected": [...]}``. A ranking of K traces gives
               K(K-1)/2 pairs (each trace against every trace ranked below it).
``trl-text``   the same pairs in TRL's *standard* format: plain strings. The
               prompt is the system instruction and the case rendered as text
               (the same layout ``prompts.encode_prompt`` uses for a tokenizer
               without a chat template), ending in a newline.
``rankings``   one row per ranking: case, prompt, the full K-way order with each
               trace's text, verdict, safety result and rationalised flag,
               annotator, comments, note, policy version, time. This is the
               lossless format (``import`` reads it back).
``agreement``  one row per trace group ranked by two or more annotators, with
               Kendall's tau between every pair of them.

Pair rows also carry metadata keys -- ``case_id``, ``ranking_uid``,
``annotator``, ``workspace``, ``chosen_trace_id``, ``rejected_trace_id``,
``chosen_rank``, ``rejected_rank`` (1 = best), ``rationalised`` (either trace
was sampled with the answer as a hint), ``chosen_rationalised``,
``rejected_rationalised``, ``policy_version`` and ``created``.
``datasets.load_dataset("json", ...)`` keeps them as columns; TRL's
``DPOTrainer`` tokenises only prompt/chosen/rejected and drops the other
columns (``remove_unused_columns``). None of them is named like a column TRL
interprets (``images``, ``tools``, ``chat_template_kwargs``...).

``exclude_rationalised`` leaves out every rationalised trace (pairs involving
one; in ``rankings`` the trace is removed from the order and a ranking left
with fewer than two traces is dropped).

``importer.import_file`` reads a ``rankings`` export or TRL pair file back in.
"""
from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator

from ..clinical.cases import Case
from ..rollout.prompts import build_messages
from .store import Store

log = logging.getLogger(__name__)

FORMATS = ("trl", "trl-text", "rankings", "agreement")
RANKINGS_FORMAT = "rlhf-control-room/rankings@1"


# --------------------------------------------------------------------------- prompts


def as_messages(prompt: list[dict] | str) -> list[dict]:
    """A stored prompt as chat messages (a plain-string prompt becomes one user message)."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [{"role": str(m["role"]), "content": str(m["content"])} for m in prompt]


def plain_prompt(prompt: list[dict] | str) -> str:
    """A prompt as plain text: the system instruction, then the case, then
    ``Reasoning:`` and a newline (the no-chat-template layout of ``encode_prompt``)."""
    if isinstance(prompt, str):
        return prompt
    system = "\n\n".join(m["content"] for m in prompt if m["role"] == "system")
    user = "\n".join(m["content"] for m in prompt if m["role"] == "user")
    text = (system + "\n\n" if system else "") + "Case: " + user + "\n\nReasoning:\n"
    return text


# --------------------------------------------------------------------------- reading the store


def _workspaces(store: Store, workspace: str | None) -> list[str]:
    if workspace is None:
        return [w["name"] for w in store.workspaces()]
    if store.workspace(workspace) is None:
        raise ValueError(f"no workspace named {workspace!r} in {store.path}")
    return [workspace]


def ranking_records(store: Store, workspace: str | None = None, exclude_rationalised: bool = False) -> Iterator[dict]:
    """Every ranking as a ``rankings``-format row, oldest first. With no workspace,
    all workspaces (a ranking copied into several by an import appears once)."""
    seen: set[str] = set()
    skipped = 0
    for ws in _workspaces(store, workspace):
        traces = {t.trace_id: t for t in store.traces(ws, light=True)}
        cases: dict[str, Case | None] = {}
        for r in store.rankings(ws):
            if r["uid"] in seen:
                continue
            seen.add(r["uid"])
            if r["case_id"] not in cases:
                cases[r["case_id"]] = store.case(r["case_id"])
            case = cases[r["case_id"]]
            prompt = r["prompt"] if r["prompt"] is not None else (build_messages(case) if case else None)
            if prompt is None:
                skipped += 1
                continue
            ordered = []
            for rank, tid in enumerate(r["trace_ids"], start=1):
                t = traces[tid]
                if exclude_rationalised and t.rationalised:
                    continue
                below = r["ranked"] is not None and rank > r["ranked"]
                ordered.append(
                    {
                        "trace_id": t.trace_id,
                        # traces below the line share the rank after the last ordered one
                        "rank": r["ranked"] + 1 if below else rank,
                        "below_the_line": below,
                        "text": t.text,
                        "conclusion": t.conclusion,
                        "finish_reason": t.finish_reason,
                        "rationalised": bool(t.rationalised),
                        "verdict": t.verdict,
                        "safety": t.safety,
                        "policy_version": t.policy_version,
                        "sampling": t.sampling or {},
                        "comment": r["comments"].get(tid, ""),
                        "reward_score": ((r["suggestion"] or {}).get("scores") or {}).get(tid),
                    }
                )
            if len(ordered) < 2:
                continue
            yield {
                "format": RANKINGS_FORMAT,
                "ranking_uid": r["uid"],
                "workspace": ws,
                "case_id": r["case_id"],
                "case": case.to_dict() if case else None,
                "prompt": prompt,
                "annotator": r["annotator"],
                "comments": r["comments"],
                "note": r["note"],
                "policy_version": r["policy_version"],
                "status": r["status"],
                "source": r["source"],
                "created": r["created"],
                "traces": ordered,
                # the reward model's suggested order as shown (scores, the model, its accuracy) and
                # how far the clinician moved from it; None when no suggestion was shown
                "suggestion": r["suggestion"],
            }
    if skipped:
        log.warning("%d ranking(s) left out: their prompt is unknown (no case stored)", skipped)


def pair_rows(store: Store, workspace: str | None = None, exclude_rationalised: bool = False, text: bool = False) -> Iterator[dict]:
    """Every ranked (chosen, rejected) pair in TRL's preference format."""
    for rec in ranking_records(store, workspace, exclude_rationalised):
        prompt = plain_prompt(rec["prompt"]) if text else as_messages(rec["prompt"])
        for better, worse in itertools.combinations(rec["traces"], 2):
            if better["rank"] == worse["rank"]:  # tied below the line: no preference between them
                continue
            if text:
                chosen, rejected = better["text"], worse["text"]
            else:
                chosen = [{"role": "assistant", "content": better["text"]}]
                rejected = [{"role": "assistant", "content": worse["text"]}]
            yield {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "case_id": rec["case_id"],
                "ranking_uid": rec["ranking_uid"],
                "annotator": rec["annotator"],
                "workspace": rec["workspace"],
                "chosen_trace_id": better["trace_id"],
                "rejected_trace_id": worse["trace_id"],
                "chosen_rank": better["rank"],
                "rejected_rank": worse["rank"],
                "rationalised": bool(better["rationalised"] or worse["rationalised"]),
                "chosen_rationalised": bool(better["rationalised"]),
                "rejected_rationalised": bool(worse["rationalised"]),
                "policy_version": rec["policy_version"],
                "created": rec["created"],
            }


# --------------------------------------------------------------------------- agreement


def kendall_tau(order_a: list, order_b: list) -> float:
    """Kendall's tau between two strict rankings (best to worst) of the same items:
    (concordant - discordant) / (n(n-1)/2); 1 = identical, -1 = reversed."""
    if sorted(map(str, order_a)) != sorted(map(str, order_b)) or len(set(order_a)) != len(order_a):
        raise ValueError("both rankings must order the same distinct items")
    n = len(order_a)
    if n < 2:
        raise ValueError("Kendall's tau needs at least two items")
    pos_b = {item: i for i, item in enumerate(order_b)}
    concordant = discordant = 0
    for i, j in itertools.combinations(range(n), 2):
        # in order_a, item i is ranked above item j
        if pos_b[order_a[i]] < pos_b[order_a[j]]:
            concordant += 1
        else:
            discordant += 1
    return (concordant - discordant) / (n * (n - 1) / 2)


def _ordered(ranking: dict) -> list[str]:
    """The trace ids a ranking orders: all of them, or those above the line."""
    ids = ranking["trace_ids"]
    return ids if ranking.get("ranked") is None else ids[: ranking["ranked"]]


def agreement(store: Store, workspace: str | None = None) -> list[dict]:
    """One row per trace group that two or more annotators ranked: the annotators,
    Kendall's tau for every pair of them over the traces they ordered (traces tied
    below the line agree by construction and do not count; each annotator's latest
    ranking of the group counts) and the mean. Groups must be the same set of traces."""
    rows = []
    for ws in _workspaces(store, workspace):
        groups: dict[str, dict[str, dict]] = {}
        for r in store.rankings(ws):
            groups.setdefault(r["group_key"], {})[r["annotator"]] = r  # later rankings replace earlier
        for key, by_annotator in groups.items():
            if len(by_annotator) < 2:
                continue
            annotators = sorted(by_annotator)
            first = by_annotator[annotators[0]]
            if len(_ordered(first)) < 2 or any(set(_ordered(r)) != set(_ordered(first)) for r in by_annotator.values()):
                continue  # nothing ordered to compare (one trace above the line), or different lines
            pairs = [
                {"a": a, "b": b, "tau": kendall_tau(_ordered(by_annotator[a]), _ordered(by_annotator[b]))}
                for a, b in itertools.combinations(annotators, 2)
            ]
            rows.append(
                {
                    "workspace": ws,
                    "case_id": first["case_id"],
                    "group_key": key,
                    "n_traces": len(first["trace_ids"]),
                    "annotators": annotators,
                    "ranking_uids": [by_annotator[a]["uid"] for a in annotators],
                    "pairs": pairs,
                    "mean_tau": sum(p["tau"] for p in pairs) / len(pairs),
                }
            )
    return rows


def agreement_summary(rows: list[dict]) -> dict:
    """Totals over ``agreement`` rows: groups, annotator pairs, mean tau (None when empty)."""
    taus = [p["tau"] for r in rows for p in r["pairs"]]
    return {
        "groups": len(rows),
        "annotator_pairs": len(taus),
        "mean_tau": sum(taus) / len(taus) if taus else None,
    }


# --------------------------------------------------------------------------- writing


def rows_for(store: Store, fmt: str, workspace: str | None = None, exclude_rationalised: bool = False) -> Iterator[dict]:
    """The rows of export format ``fmt`` (one of ``FORMATS``) for ``workspace``, or for all when None."""
    if fmt == "trl":
        return pair_rows(store, workspace, exclude_rationalised)
    if fmt == "trl-text":
        return pair_rows(store, workspace, exclude_rationalised, text=True)
    if fmt == "rankings":
        return ranking_records(store, workspace, exclude_rationalised)
    if fmt == "agreement":
        return iter(agreement(store, workspace))
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")


def write_jsonl(rows: Iterable[dict], out: str | os.PathLike) -> int:
    """Write rows atomically (temp file renamed into place); returns how many."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for row in rows:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return n


def export(store: Store, fmt: str, out: str | os.PathLike, workspace: str | None = None, exclude_rationalised: bool = False) -> int:
    """Write one export file; returns the number of rows."""
    return write_jsonl(rows_for(store, fmt, workspace, exclude_rationalised), out)


def export_file(
    store: Store,
    fmt: str,
    directory: str | os.PathLike | None = None,
    workspace: str | None = None,
    exclude_rationalised: bool = False,
) -> Path:
    """Export to a new, timestamped file (for a download button) and return its path.
    Default folder: ``exports/`` next to the database."""
    folder = Path(directory) if directory is not None else store.folder / "exports"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    suffix = "-no-rationalised" if exclude_rationalised else ""
    path = folder / f"{workspace or 'all'}-{fmt}{suffix}-{stamp}.jsonl"
    n = 1
    while path.exists():
        path = folder / f"{workspace or 'all'}-{fmt}{suffix}-{stamp}-{n}.jsonl"
        n += 1
    export(store, fmt, path, workspace, exclude_rationalised)
    return path


def checkpoint_archive(directory: str | os.PathLike, out: str | os.PathLike | None = None) -> Path:
    """Zip a checkpoint folder (for a download button); returns the .zip path.
    Default: ``<folder>.zip`` beside it. Unzipped, it is a folder ``Engine.load`` reads."""
    directory = Path(directory)
    if not (directory / "manifest.json").is_file():
        raise ValueError(f"{directory} is not a checkpoint (no manifest.json)")
    out = Path(out) if out is not None else directory.with_suffix(".zip")
    out.parent.mkdir(parents=True, exist_ok=True)
    base = str(out)[: -len(".zip")] if str(out).endswith(".zip") else str(out)
    return Path(shutil.make_archive(base, "zip", root_dir=directory))
