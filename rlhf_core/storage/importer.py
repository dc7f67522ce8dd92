"""Reading a ``rankings`` export or a TRL pair file back into a workspace.

An import happens in two phases. First every line is parsed and checked
(``plan_rankings``: no database involved), so a bad value anywhere refuses the
whole file with one ``ValueError`` naming the file, the line and the problem.
Then every ranking is written in one transaction (``Store.batch``): all of them
or, on any error, none.

Trace ids in a file are the other site's: an id this workspace already uses
for a *different* text is re-keyed (``imp-`` + a digest of the id and the
text), so an imported ranking never binds to one of our traces. The same id
with the same text is the same trace (re-importing our own export dedupes).

Pairs written by our own ``trl`` / ``trl-text`` export carry their ranking's
uid, trace ids and ranks, so each K-way ranking is put back together; other
pairs become two-trace rankings. Importing the same data twice adds nothing:
rankings are keyed by ``ranking_uid`` (foreign pairs by their content and
annotator).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..clinical import untrusted
from ..clinical.cases import Case, CaseFormatError, case_from_record
from ..rollout.records import Trace
from .store import Store, content_id

MAX_IMPORT_BYTES = 200 * 1024 * 1024  # files larger than this are refused before reading
MAX_TEXT_CHARS = 200_000  # longest accepted text (a trace, a prompt message) in an import
MAX_TRACES = 64  # most traces in one imported ranking


def read_jsonl_objects(path: str | os.PathLike, empty_message: str = "no rows to import",
                       max_chars: int = MAX_TEXT_CHARS) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSON lines file. Anything
    that is not usable JSON -- invalid UTF-8, NaN, 1,000-deep nesting, a number of
    thousands of digits, a lone surrogate, an over-long text -- is one ValueError
    naming the file and the line."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_IMPORT_BYTES:
        raise ValueError(f"{path}: file is {size} bytes, larger than the limit MAX_IMPORT_BYTES={MAX_IMPORT_BYTES}")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig").lstrip("\ufeff")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}: line {line}: not valid UTF-8 text ({err.reason})") from None
    rows = []
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = untrusted.loads(line)
        except ValueError as err:
            raise ValueError(f"{path}: line {lineno}: {err}") from None
        if not isinstance(row, dict):
            raise ValueError(f"{path}: line {lineno}: expected a JSON object, got {type(row).__name__}")
        trouble = untrusted.problem(row, max_chars, "MAX_TEXT_CHARS")
        if trouble:
            raise ValueError(f"{path}: line {lineno}: {trouble}")
        rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{path}: {empty_message}")
    return rows


# --------------------------------------------------------------------------- typed fields


def _int(value: Any, name: str, default: int | None = None) -> int | None:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def _str(value: Any, name: str, default: str | None = None) -> str | None:
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValueError(f"{name} must be text, got {type(value).__name__}")
    return value


def _flag(value: Any, name: str) -> bool:
    if value is None:
        return False
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{name} must be true or false, got {str(value)[:40]!r}")


def _object(value: Any, name: str) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be an object, got {type(value).__name__}")
    return value


def _prompt(value: Any) -> list[dict] | str:
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in value
    ):
        return [{"role": m["role"], "content": m["content"]} for m in value]
    raise ValueError("prompt must be text or a list of {role, content} messages")


def _completion_text(value: Any) -> str:
    """The assistant text of a TRL completion (a string or a list of messages)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        parts = [m.get("content") for m in value if m.get("role", "assistant") == "assistant"]
        if parts and all(isinstance(p, str) for p in parts):
            return "\n".join(parts)
    raise ValueError(f"expected a string or a list of assistant messages, got {type(value).__name__}")


def _comments(value: Any) -> dict[str, str]:
    value = _object(value, "comments") or {}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ValueError("comments must map trace ids to text")
    return dict(value)


# --------------------------------------------------------------------------- phase 1: plan


@dataclass
class PlannedRanking:
    """One ranking read from a file, checked, not yet written."""

    line: int
    uid: str
    prompt: list[dict] | str
    traces: list[Trace]  # best first
    annotator: str
    case: Case | None = None
    comments: dict[str, str] = field(default_factory=dict)
    note: str = ""
    policy_version: int | None = None
    created: str | None = None
    ranked: int | None = None  # traces above the line; the rest are tied below


def _trace(case_id: str, d: Any, default_id: str, where: str) -> Trace:
    if not isinstance(d, dict):
        raise ValueError(f"{where} must be an object, got {type(d).__name__}")
    text = _str(d.get("text"), f"{where}.text")
    if text is None:
        raise ValueError(f"{where} has no text")
    return Trace(
        case_id=case_id, prompt_ids=[], completion_ids=[], text=text,
        finish_reason=_str(d.get("finish_reason"), f"{where}.finish_reason", ""),
        old_logps=[], ref_logps=[],
        policy_version=_int(d.get("policy_version"), f"{where}.policy_version", 0),
        rationalised=_flag(d.get("rationalised"), f"{where}.rationalised"),
        sampling=_object(d.get("sampling"), f"{where}.sampling") or {},
        trace_id=_str(d.get("trace_id"), f"{where}.trace_id") or default_id,
        verdict=_object(d.get("verdict"), f"{where}.verdict"),
        safety=_object(d.get("safety"), f"{where}.safety"),
        conclusion=_object(d.get("conclusion"), f"{where}.conclusion"),
    )


def _plan_ranking_row(row: dict, lineno: int, path: Path, annotator: str) -> PlannedRanking:
    prompt = _prompt(row.get("prompt"))
    case = case_from_record(row["case"], path, lineno) if row.get("case") is not None else None
    case_id = _str(row.get("case_id"), "case_id") or (case.id if case else content_id(prompt, prefix="import-case-"))
    dicts = row.get("traces")
    if not isinstance(dicts, list) or not 2 <= len(dicts) <= MAX_TRACES:
        raise ValueError(f"traces must be a list of 2 to {MAX_TRACES} trace objects")
    if not all(isinstance(d, dict) for d in dicts):
        raise ValueError("traces must be a list of trace objects")
    ranks = [_int(d.get("rank"), f"traces[{i}].rank", 0) for i, d in enumerate(dicts)]
    order = sorted(range(len(dicts)), key=lambda i: ranks[i])
    dicts = [dicts[i] for i in order]
    traces = [_trace(case_id, d, content_id(prompt, d.get("text")), f"traces[{order[i]}]") for i, d in enumerate(dicts)]
    below = [_flag(d.get("below_the_line"), "below_the_line") for d in dicts]
    if any(below) and not all(below[below.index(True):]):
        raise ValueError("traces below the line must come after every ranked trace")
    comments = _comments(row.get("comments"))
    for d, t in zip(dicts, traces):
        comment = _str(d.get("comment"), "comment")
        if comment and t.trace_id not in comments:
            comments[t.trace_id] = comment
    return PlannedRanking(
        line=lineno, uid=_str(row.get("ranking_uid"), "ranking_uid"), prompt=prompt, traces=traces,
        annotator=annotator or _str(row.get("annotator"), "annotator") or "", case=case, comments=comments,
        note=_str(row.get("note"), "note", ""), policy_version=_int(row.get("policy_version"), "policy_version"),
        created=_str(row.get("created"), "created"), ranked=(len(traces) - sum(below)) if any(below) else None,
    )


def _plan_pair_row(row: dict, lineno: int, annotator: str) -> PlannedRanking:
    prompt = _prompt(row.get("prompt"))
    chosen, rejected = _completion_text(row.get("chosen")), _completion_text(row.get("rejected"))
    case_id = _str(row.get("case_id"), "case_id") or content_id(prompt, prefix="import-case-")
    either = _flag(row.get("rationalised"), "rationalised")
    traces = []
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        d = {"text": text, "trace_id": row.get(f"{side}_trace_id"),
             "rationalised": row.get(f"{side}_rationalised", either)}
        traces.append(_trace(case_id, d, content_id(prompt, text), side))
    if traces[0].trace_id == traces[1].trace_id:
        raise ValueError("chosen and rejected are the same trace")
    return PlannedRanking(
        line=lineno, uid=content_id("pair", prompt, chosen, rejected, annotator), prompt=prompt, traces=traces,
        annotator=annotator, policy_version=_int(row.get("policy_version"), "policy_version"),
        created=_str(row.get("created"), "created"),
    )


_PAIR_KEYS = ("ranking_uid", "chosen_trace_id", "rejected_trace_id", "chosen_rank", "rejected_rank")


def _regroup_pairs(rows: list[tuple[int, dict]], path: Path) -> list[tuple[int, dict]]:
    """Pair rows written by our own export carry their ranking's uid, trace ids and
    ranks: put each ranking back together (so it dedupes against a ``rankings``
    import of the same data). Other rows pass through."""
    out: list[tuple[int, dict]] = []
    groups: dict[str, dict] = {}
    for lineno, row in rows:
        if not ({"prompt", "chosen", "rejected"} <= row.keys() and all(row.get(k) is not None for k in _PAIR_KEYS)):
            out.append((lineno, row))
            continue
        try:
            uid = _str(row["ranking_uid"], "ranking_uid")
            group = groups.get(uid)
            if group is None:
                group = {key: row.get(key) for key in ("prompt", "case_id", "annotator", "policy_version", "created")}
                group.update(ranking_uid=uid, traces=[], _texts={})
                groups[uid] = group
                out.append((lineno, group))
            elif group["prompt"] != row["prompt"]:
                raise ValueError(f"ranking {uid} appears with two different prompts")
            for side in ("chosen", "rejected"):
                tid, text = _str(row[f"{side}_trace_id"], f"{side}_trace_id"), _completion_text(row[side])
                known = group["_texts"].get(tid)
                if known is None:
                    group["_texts"][tid] = text
                    group["traces"].append({
                        "trace_id": tid, "rank": _int(row[f"{side}_rank"], f"{side}_rank"), "text": text,
                        "rationalised": row.get(f"{side}_rationalised", row.get("rationalised", False)),
                    })
                elif known != text:
                    raise ValueError(f"trace {tid} appears with two different texts")
        except ValueError as err:
            raise ValueError(f"{path}: line {lineno}: {err}") from None
    for group in groups.values():
        del group["_texts"]
        ranks = [t["rank"] for t in group["traces"]]
        if ranks.count(max(ranks)) > 1:  # the traces tied at the bottom were below the line
            for t in group["traces"]:
                t["below_the_line"] = t["rank"] == max(ranks)
    return out


def plan_rankings(rows: list[tuple[int, dict]], path: Path, annotator: str | None = None) -> list[PlannedRanking]:
    """Every row checked and turned into a ranking; the first problem raises
    ValueError naming file and line. Pure: reads no database."""
    source = f"import:{path.name}"
    planned = []
    for lineno, row in _regroup_pairs(rows, path):
        try:
            if "traces" in row and "ranking_uid" in row:
                planned.append(_plan_ranking_row(row, lineno, path, annotator or ""))
            elif {"prompt", "chosen", "rejected"} <= row.keys():
                who = annotator or _str(row.get("annotator"), "annotator") or source
                plan = _plan_pair_row(row, lineno, who)
                if row.get("ranking_uid") is not None:
                    plan.uid = _str(row["ranking_uid"], "ranking_uid")
                planned.append(plan)
            else:
                raise ValueError("neither a rankings row (ranking_uid, traces) nor a preference pair "
                                 "(prompt, chosen, rejected)")
        except CaseFormatError:
            raise
        except ValueError as err:
            raise ValueError(f"{path}: line {lineno}: {err}") from None
        planned[-1].annotator = planned[-1].annotator or source
        if not planned[-1].uid:
            raise ValueError(f"{path}: line {lineno}: ranking_uid is empty")
    return planned


# --------------------------------------------------------------------------- phase 2: write


def _own_ids(store: Store, workspace: str, plan: PlannedRanking, claimed: dict[str, str]) -> None:
    """Re-key every trace whose id this workspace (or an earlier line of the file)
    already gives to a different text."""
    stored = store.trace_texts(workspace, [t.trace_id for t in plan.traces])
    for t in plan.traces:
        known = claimed.get(t.trace_id, stored.get(t.trace_id))
        if known is not None and known != t.text:
            new_id = content_id("imported", t.trace_id, t.text)
            if t.trace_id in plan.comments:
                plan.comments[new_id] = plan.comments.pop(t.trace_id)
            t.trace_id = new_id
        claimed[t.trace_id] = t.text


def import_file(store: Store, path: str | os.PathLike, workspace: str = "default", annotator: str | None = None) -> dict:
    """Import a ``rankings`` export or a TRL pair file (conversational or text)
    into ``workspace`` (created if missing), all or nothing. Imported traces carry
    text, verdict and safety but no token data: they are training data for export
    and offline training, and count in the agreement view; the live policy is not
    updated.

    Returns counts: {"rows", "rankings_added", "rankings_skipped", "traces_added"}.
    ``annotator`` overrides the annotator of every imported row; otherwise a
    row's own ``annotator`` is kept, or ``import:<file name>`` when it has none.
    """
    path = Path(path)
    rows = read_jsonl_objects(path)
    planned = plan_rankings(rows, path, annotator)
    source = f"import:{path.name}"
    store.ensure_workspace(workspace)
    existing = {r["uid"] for r in store.rankings(workspace)}
    traces_before = store.count("traces", workspace)
    added = skipped = 0
    claimed: dict[str, str] = {}
    with store.batch():
        for plan in planned:
            if plan.uid in existing:
                skipped += 1
                continue
            try:
                _own_ids(store, workspace, plan, claimed)
                store.record_ranking(
                    workspace, plan.traces, list(range(len(plan.traces))), plan.annotator,
                    comments=plan.comments, note=plan.note, case=plan.case, prompt=plan.prompt,
                    policy_version=plan.policy_version, uid=plan.uid, created=plan.created, source=source,
                    ranked=plan.ranked,
                )
            except ValueError as err:
                raise ValueError(f"{path}: line {plan.line}: {err} (nothing was imported)") from None
            existing.add(plan.uid)
            added += 1
    return {
        "rows": len(planned),
        "rankings_added": added,
        "rankings_skipped": skipped,
        "traces_added": store.count("traces", workspace) - traces_before,
    }
