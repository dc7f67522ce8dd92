"""HTML fragments for the UI. Every piece of model output or case text goes
through ``esc`` (html.escape) here, so a trace containing markup renders as
inert text. Long trace texts themselves are shown in read-only textboxes."""
from __future__ import annotations

import html

from rlhf_core.clinical.cases import Case

from .ranking import hard_violations, letter


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def badge(kind: str, text: str) -> str:
    return f'<span class="cr-badge cr-{esc(kind)}">{esc(text)}</span>'


def verdict_kind(trace: dict) -> str:
    """"accepted" | "rationalised" | "rejected" for a finished trace."""
    verdict = trace.get("verdict") or {}
    if not verdict.get("accepted"):
        return "rejected"
    return "rationalised" if trace.get("rationalised") else "accepted"


def safety_html(trace: dict) -> str:
    safety = trace.get("safety")
    if not safety:
        return ""
    score = safety.get("score")
    level = "ok" if score is not None and score >= 0.8 else ("warn" if score is not None and score >= 0.5 else "bad")
    hard = bool(hard_violations(trace))
    text = f"safety {score:.2f}" if isinstance(score, (int, float)) else "safety n/a"
    out = badge(f"safety-{level}", text)
    if hard:
        out += " " + badge("hard", "hard violation · cannot rank first")
    return out


def violations_html(trace: dict) -> str:
    items = []
    for v in (trace.get("safety") or {}).get("violations") or []:
        drug = f" <b>{esc(v.get('drug'))}</b>" if v.get("drug") else ""
        evidence = f' <span class="cr-evidence">“{esc(v.get("evidence"))}”</span>' if v.get("evidence") else ""
        items.append(f'<li>{badge("sev-" + str(v.get("severity", "soft")), v.get("severity", "soft"))}'
                     f'{drug} {esc(v.get("reason") or v.get("kind"))}{evidence}</li>')
    return f'<ul class="cr-violations">{"".join(items)}</ul>' if items else ""


_TRIGGERS = {
    "written": "the model wrote the label itself",
    "eos": "the label was inserted where the model stopped",
    "sentence": "the label was inserted at the end of a sentence, the reasoning budget nearly spent",
    "budget": "the label was inserted at the reasoning budget",
}


def conclusion_note(trace: dict) -> str:
    """How the trace's conclusion was reached, in one line (empty when unknown)."""
    c = trace.get("conclusion") or {}
    if not c:
        return ""
    if not c.get("constrained"):
        return "conclusion written freely by the model"
    n = len(c.get("candidates") or [])
    probs = c.get("probabilities") or []
    chosen = c.get("chosen")
    p = f" (the model gave it p = {probs[chosen]:.2f})" if chosen is not None and chosen < len(probs) else ""
    why = _TRIGGERS.get(c.get("trigger"), "")
    return f"conclusion chosen by the model among {n} candidates{p}" + (f"; {why}" if why else "")


def change_html(change: dict | None) -> str:
    """What the last update did to a trace: "now 2.1× as likely (+0.0061 nats/token)"."""
    if not change:
        return ""
    ratio, per_token = change["ratio"], change["per_token"]
    kind = "up" if ratio >= 1 else "down"
    return (f'<div class="cr-change cr-change-{kind}" title="the policy after the update against the policy that '
            f'sampled this trace: the probability of the whole trace, and the mean change of log-probability per '
            f'token">after the update: now <b>{ratio:.3g}×</b> as likely ({per_token:+.4f} nats/token)</div>')


def changed_mind_html(verdict: dict) -> str:
    """A warning badge when an accepted trace's reasoning first concluded another candidate."""
    earlier = verdict.get("earlier_conclusion")
    if not earlier:
        return ""
    return (f' <span class="cr-badge cr-warn" title="its reasoning said the diagnosis was &quot;{esc(earlier)}&quot; '
            f'before the conclusion named the answer: the conclusion stands (the last word counts), but the '
            f'reasoning did not lead to it">⚠ first concluded another diagnosis</span>')


def trace_header(trace: dict, index: int, position: int | None = None, change: dict | None = None) -> str:
    """The top of a finished trace card: name, verdict badge, diagnosis, reason, safety,
    and ``change``, what the last update did to it (``updates.likelihood_changes``)."""
    kind = verdict_kind(trace)
    verdict = trace.get("verdict") or {}
    label = {"accepted": "✓ accepted", "rationalised": "✓ rationalised", "rejected": "✗ rejected"}[kind]
    rank = f'<span class="cr-rank">#{position}</span>' if position else ""
    diagnosis = esc(verdict.get("diagnosis") or "no conclusion")
    note = ' <span class="cr-muted">sampled with the answer as a hint (STaR)</span>' if trace.get("rationalised") else ""
    return (
        f'<div class="cr-card-head"><div class="cr-card-title">{rank}<b>Trace {esc(letter(index))}</b> '
        f'{badge(kind, label)} {safety_html(trace)}{changed_mind_html(verdict)}</div>'
        f'<div class="cr-dx">Final diagnosis: <b>{diagnosis}</b></div>'
        f'<div class="cr-reason">{esc(verdict.get("reason"))}{note}'
        f' <span class="cr-muted">· policy v{esc(trace.get("policy_version"))} · {esc(len(trace.get("completion_ids") or []))} tokens</span></div>'
        + (f'<div class="cr-muted cr-conclusion">{esc(conclusion_note(trace))}</div>' if conclusion_note(trace) else "")
        + f'{violations_html(trace)}{change_html(change)}</div>'
    )


def live_header(slot: int, phase: str) -> str:
    what = "rationalising (answer given as hint)" if phase == "rationalising" else "sampling"
    return (f'<div class="cr-card-head"><div class="cr-card-title"><b>Sample {slot + 1}</b> '
            f'{badge("pending", "decoding…")} <span class="cr-muted">{esc(what)}</span></div></div>')


def _rejected_item(t: dict) -> str:
    """One rejected trace, collapsed to its verdict line."""
    verdict = t.get("verdict") or {}
    return (
        f'<details class="cr-rej-item"><summary>{badge(verdict_kind(t), "✗ " + str(verdict.get("code", "rejected")))} '
        f'<b>{esc(verdict.get("diagnosis") or "no conclusion")}</b> — {esc(verdict.get("reason"))} {safety_html(t)}</summary>'
        f'{violations_html(t)}<pre class="cr-pre">{esc(t.get("text"))}</pre></details>'
    )


def rejected_html(rejected: list[dict]) -> str:
    """Rejected traces, each collapsed; shown for context, never rankable."""
    if not rejected:
        return '<div class="cr-muted">No rejected traces.</div>'
    return "".join(_rejected_item(t) for t in rejected)


def below_the_line_html(negatives: list[dict]) -> str:
    """The rejected traces that join the ranking as negatives, under every ranked trace."""
    if not negatives:
        return ('<div class="cr-below cr-muted">Below the line: no rejected trace this time '
                '(only the ranked traces are trained on).</div>')
    items = [_rejected_item(t) for t in negatives]
    return (f'<div class="cr-below"><div class="cr-below-title"><b>Below the line</b> · {len(negatives)} rejected '
            f'trace{"s" if len(negatives) != 1 else ""}, trained as worse than every ranked trace (tied with each other; '
            f'never rankable above the line)</div>{"".join(items)}</div>')


def progress_html(label: str, fraction: float | None, detail: str = "", state: str = "running") -> str:
    pct = 0 if fraction is None else max(0.0, min(1.0, fraction)) * 100
    return (f'<div class="cr-progress cr-progress-{esc(state)}"><div class="cr-progress-label">'
            f'<b>{esc(label)}</b> <span class="cr-muted">{esc(detail)}</span></div>'
            f'<div class="cr-bar"><div class="cr-bar-fill" style="width:{pct:.1f}%"></div></div></div>')


def status_html(message: str, kind: str = "info") -> str:
    return f'<div class="cr-status cr-status-{esc(kind)}">{esc(message)}</div>' if message else ""


def case_meta_html(case: Case | None, heldout: bool = False) -> str:
    """The picked case's facts (specialty, safety facts, the answer behind a fold); ``heldout``
    marks a case held out for evaluation."""
    if case is None:
        return '<div class="cr-muted">Pick a case to see its vignette.</div>'
    s = case.safety
    facts = [("specialty", case.specialty), ("difficulty", case.difficulty), ("ICD-10", case.icd10)]
    chips = " ".join(badge("chip", f"{k}: {v}") for k, v in facts if v)
    if case.is_multiple_choice:
        chips += " " + badge("chip", f"multiple choice ({len(case.options)} options)")
    patient = [("allergies", ", ".join(s.allergies)), ("medications", ", ".join(s.medications)),
               ("conditions", ", ".join(s.conditions))]
    flags = [badge("hard", "emergency")] if s.emergency else []
    flags += [badge("warn", "pregnant")] if s.pregnant else []
    flags += [badge("warn", "held out for evaluation: training on it needs a confirmation")] if heldout else []
    lines = "".join(f"<div><span class='cr-muted'>{esc(k)}:</span> {esc(v)}</div>" for k, v in patient if v)
    return (f'<div class="cr-case-meta"><div>{badge("id", case.id)} {chips} {" ".join(flags)}</div>{lines}'
            f'<details class="cr-answer"><summary>Reference answer</summary><b>{esc(case.answer)}</b>'
            f'{(" · also accepted: " + esc(", ".join(case.aliases))) if case.aliases else ""}</details></div>')


def header_html(info: dict) -> str:
    unsaved = info.get("unsaved_updates", 0)
    if info.get("persistent"):  # rankings are in the database; a restart replays updates past the checkpoint
        saved = badge("chip", "workspace " + str(info.get("workspace"))) + " " + badge("ok", "saved to the database")
    elif unsaved:
        saved = badge("warn", f"{unsaved} update(s) not in a checkpoint")
    else:
        saved = badge("ok", "checkpoint up to date")
    restoring = info.get("restoring")
    if restoring:
        total = restoring.get("total")
        progress = f"{restoring['done']} of {total} rankings replayed" if total is not None else "loading the workspace"
        saved += " " + badge("warn", f"restoring the policy: {progress}; generation and updates wait for it")
    return (f'<div class="cr-header"><div class="cr-title">RLHF control room '
            f'<span class="cr-muted">medical reasoning</span></div><div class="cr-header-facts">'
            f'{badge("chip", "model " + str(info.get("model")))} {badge("chip", str(info.get("mode")) + " fine-tuning" if info.get("mode") == "full" else "LoRA")} '
            f'{badge("chip", str(info.get("device")) + " · " + str(info.get("dtype")))} '
            f'{badge("version", "policy v" + str(info.get("version")))} '
            f'{badge("chip", str(info.get("rankings", 0)) + " rankings")} {saved}</div></div>')


def model_info(d: dict) -> str:
    """The model panel's summary of the loaded policy (``ControlRoom.describe()``)."""
    mode = "LoRA adapter" if d["mode"] == "lora" else "full fine-tuning"
    trained, layers = d.get("trained_layers") or (None, None)
    if d["mode"] == "lora" and trained is not None:
        mode += f" on the top {trained} of {layers} layers" if trained < layers else " on every layer"
    if d.get("persistent"):
        where = (f'<div>workspace <b>{esc(d.get("workspace"))}</b> · {d["rankings"]} rankings stored · '
                 f'{d["unsaved_updates"]} update(s) since the last checkpoint (replayed on restart) · '
                 f'database <code>{esc(d.get("db"))}</code></div>')
        count = ""
    else:
        where = '<div class="cr-muted">no database: rankings and history live in memory only</div>'
        count = f' · {d["rankings"]} rankings this session · {d["unsaved_updates"]} update(s) not in a checkpoint'
    return (f'<div class="cr-case-meta"><div><b>{esc(d["model"])}</b> · {esc(mode)} · {esc(d["device"])} {esc(d["dtype"])} · '
            f'{d["trainable_parameters"]:,} trainable parameters</div><div>policy v{d["version"]} (run {d["run"]}){count}</div>'
            f'{where}</div>')
