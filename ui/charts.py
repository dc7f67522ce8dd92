"""Plotly figures of the session's metrics: pure functions of a list of records.

Records (see ``ControlRoom``) have ``kind`` "generation" (x = the policy
version that sampled), "step" (x = a fractional version while an update runs)
or "update" (x = the version it produced), and a ``run`` number that changes
whenever the policy is replaced. The current run is drawn in colour, earlier
runs in grey.
"""
from __future__ import annotations

import math

import plotly.graph_objects as go

CHARTS = {  # elem_id suffix -> title
    "probe": "Probe: P(correct diagnosis)",
    "kl": "KL from the reference",
    "loss": "Loss",
    "rewards": "DPO implicit rewards",
    "accuracy": "Ranking fit",
    "safety": "Safety score",
    "acceptance": "Acceptance rate",
}
CAPTIONS = {  # one plain-language line under each title
    "probe": "taught vs held-out cases; scored, not sampled",
    "kl": "how far the model has moved from where it started",
    "loss": "one objective per axis: DPO left, GRPO right",
    "rewards": "how much more the policy prefers chosen traces",
    "accuracy": "DPO pairs in ranked order · GRPO clipped share",
    "safety": "of the traces sampled at each version",
    "acceptance": "correct conclusions, at the sampling version",
}
COLORS = {"a": "#0f766e", "b": "#b45309", "c": "#1d4ed8", "d": "#7c3aed", "old": "#cbd5e1"}
EMPTY_HINT = {
    "probe": "No updates yet",
    "loss": "No updates yet",
    "kl": "No updates yet",
    "rewards": "No updates yet",
    "accuracy": "No updates yet",
    "safety": "No traces sampled yet",
    "acceptance": "No traces sampled yet",
}


def _ok(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _points(rows: list[dict], kind: str, key: str, run: int, algorithm: str | None = None):
    """(xs, ys) of one series in version order (records arrive stored first, then live ones,
    so a line drawn in arrival order could run backwards)."""
    points = [(r["x"] if "x" in r else r["version"], r[key]) for r in rows
              if r["kind"] == kind and r["run"] == run and _ok(r.get(key))
              and (algorithm is None or r.get("algorithm") == algorithm)]
    points.sort(key=lambda p: p[0])
    return [x for x, _ in points], [y for _, y in points]


def _series(fig: go.Figure, rows: list[dict], key: str, name: str, color: str, current: int,
            kind: str = "update", algorithm: str | None = None, steps: bool = True, dash: str | None = None,
            yaxis: str = "y") -> None:
    """Markers+line for ``kind`` records of every run, with per-step points for the current run."""
    for run in sorted({r["run"] for r in rows}):
        xs, ys = _points(rows, kind, key, run, algorithm)
        if not xs:
            continue
        old = run != current
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers", name=f"{name} (run {run})" if old else name,
            line={"color": COLORS["old"] if old else color, "width": 1.5 if old else 2.5, "dash": dash},
            marker={"size": 5 if old else 8}, yaxis=yaxis,
            legendgroup=name, hovertemplate=f"{name}<br>{WHEN[kind]} %{{x}}<br>%{{y:.4g}}<extra></extra>",
        ))
    if steps:
        xs, ys = _points(rows, "step", key, current, algorithm)
        if xs:
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="markers", name=f"{name} per step", legendgroup=name, showlegend=False, yaxis=yaxis,
                marker={"color": color, "size": 5, "opacity": 0.45, "symbol": "circle-open"},
                hovertemplate=f"{name} (step)<br>version %{{x:.2f}}<br>%{{y:.4g}}<extra></extra>",
            ))


WHEN = {"update": "after the update: version", "step": "during the update to version",
        "generation": "sampled at version"}


def _layout(fig: go.Figure, name: str, ytitle: str, empty: str | None, yrange=None,
            xspan: tuple[float, float] | None = None) -> go.Figure:
    legend = any(t.showlegend is not False for t in fig.data) and len([t for t in fig.data if t.showlegend is not False]) > 1
    fig.update_layout(
        title={"text": f"{CHARTS[name]}<br><sup style='color:#64748b'>{CAPTIONS[name]}</sup>", "x": 0.02, "y": 0.95,
               "font": {"size": 14}},
        template="plotly_white", height=290 if legend else 260,
        margin={"l": 48, "r": 48 if any(getattr(t, "yaxis", "y") == "y2" for t in fig.data) else 12, "t": 52,
                "b": 78 if legend else 40},
        # the legend sits under the x axis, never over the data
        legend={"orientation": "h", "yanchor": "top", "y": -0.28, "xanchor": "left", "x": 0, "font": {"size": 10}},
        font={"family": "system-ui, -apple-system, Segoe UI, sans-serif", "size": 11},
        hovermode="closest", showlegend=legend,
    )
    xs = [x for trace in fig.data for x in (trace.x or ())]
    if xspan is None and xs:
        xspan = (min(xs), max(xs))
    if xspan is not None:  # one version axis for every chart; padded, integer ticks
        lo, hi = xspan
        fig.update_xaxes(range=[lo - 0.35, hi + 0.35], dtick=max(1, math.ceil((hi - lo) / 8)), tickformat="d")
    fig.update_xaxes(title={"text": "policy version", "font": {"size": 11}}, zeroline=False)
    fig.update_yaxes(title={"text": ytitle, "font": {"size": 11}}, zeroline=False)
    if yrange:
        fig.update_yaxes(range=yrange)
    if empty and not fig.data:
        fig.add_annotation(text=empty, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                           font={"color": "#94a3b8", "size": 12})
        fig.update_xaxes(range=[0, 1], showticklabels=False)
        fig.update_yaxes(showticklabels=False)
    return fig


def current_run(rows: list[dict]) -> int:
    return max((r["run"] for r in rows), default=1)


def loss_figure(rows: list[dict], run: int | None = None, xspan=None) -> go.Figure:
    run = run or current_run(rows)
    fig = go.Figure()
    _series(fig, rows, "loss", "DPO loss", COLORS["a"], run, algorithm="dpo")
    _series(fig, rows, "loss", "GRPO loss", COLORS["d"], run, algorithm="grpo", yaxis="y2")
    if any(getattr(t, "yaxis", "y") == "y2" for t in fig.data):  # two objectives, two scales: never one line
        fig.update_layout(yaxis2={"overlaying": "y", "side": "right", "title": {"text": "GRPO", "font": {"size": 11}},
                                  "zeroline": False, "showgrid": False})
    return _layout(fig, "loss", "DPO", EMPTY_HINT["loss"], xspan=xspan)


def kl_figure(rows: list[dict], run: int | None = None, xspan=None) -> go.Figure:
    run = run or current_run(rows)
    fig = go.Figure()
    _series(fig, rows, "probe/kl", "on the taught probe traces (fixed)", COLORS["c"], run, steps=False)
    _series(fig, rows, "kl", "on each update's own ranked traces", COLORS["old"], run, steps=False, dash="dot")
    fig = _layout(fig, "kl", "nats / token", EMPTY_HINT["kl"], xspan=xspan)
    if fig.data:
        fig.update_yaxes(rangemode="tozero")  # a distance: never below zero
    return fig


def probe_figure(rows: list[dict], run: int | None = None, xspan=None) -> go.Figure:
    run = run or current_run(rows)
    fig = go.Figure()
    _series(fig, rows, "probe/taught_p_correct", "taught cases", COLORS["a"], run, steps=False)
    _series(fig, rows, "probe/heldout_p_correct", "held-out cases", COLORS["b"], run, steps=False, dash="dash")
    return _layout(fig, "probe", "P(correct)", EMPTY_HINT["probe"], yrange=[0, 1], xspan=xspan)


def rewards_figure(rows: list[dict], run: int | None = None, xspan=None) -> go.Figure:
    run = run or current_run(rows)
    fig = go.Figure()
    _series(fig, rows, "rewards/chosen", "DPO chosen", COLORS["a"], run, algorithm="dpo")
    _series(fig, rows, "rewards/rejected", "DPO rejected", COLORS["b"], run, algorithm="dpo")
    _series(fig, rows, "rewards/margins", "DPO margin", COLORS["c"], run, algorithm="dpo")
    return _layout(fig, "rewards", "reward", EMPTY_HINT["rewards"], xspan=xspan)


def accuracy_figure(rows: list[dict], run: int | None = None, xspan=None) -> go.Figure:
    run = run or current_run(rows)
    fig = go.Figure()
    _series(fig, rows, "rewards/accuracies", "DPO pairs ordered as ranked", COLORS["a"], run, algorithm="dpo")
    # GRPO's mean rank reward is 0.5 by construction; the clipped share varies with the update
    _series(fig, rows, "clip_ratio", "GRPO clipped ratios", COLORS["d"], run, algorithm="grpo")
    return _layout(fig, "accuracy", "share", EMPTY_HINT["accuracy"], yrange=[-0.05, 1.05], xspan=xspan)


def safety_figure(rows: list[dict], run: int | None = None, xspan=None) -> go.Figure:
    run = run or current_run(rows)
    fig = go.Figure()
    _series(fig, rows, "safety_accepted", "accepted traces", COLORS["a"], run, kind="generation", steps=False)
    _series(fig, rows, "safety_all", "all sampled", COLORS["b"], run, kind="generation", steps=False)
    return _layout(fig, "safety", "mean safety score", EMPTY_HINT["safety"], yrange=[-0.05, 1.05], xspan=xspan)


def acceptance_figure(rows: list[dict], run: int | None = None, xspan=None) -> go.Figure:
    run = run or current_run(rows)
    fig = go.Figure()
    _series(fig, rows, "acceptance_rate", "verifier acceptance", COLORS["c"], run, kind="generation", steps=False)
    return _layout(fig, "acceptance", "accepted / sampled", EMPTY_HINT["acceptance"], yrange=[-0.05, 1.05], xspan=xspan)


def version_span(rows: list[dict]) -> tuple[float, float] | None:
    """The versions any record of any run sits at: every chart's x axis."""
    xs = [r["x"] if "x" in r else r["version"] for r in rows if r["kind"] in ("update", "generation", "step")]
    xs = [x for x in xs if _ok(x)]
    return (min(xs), max(xs)) if xs else None


BUILDERS = {
    "probe": probe_figure,
    "loss": loss_figure,
    "kl": kl_figure,
    "rewards": rewards_figure,
    "accuracy": accuracy_figure,
    "safety": safety_figure,
    "acceptance": acceptance_figure,
}


def all_figures(rows: list[dict], run: int | None = None) -> dict[str, go.Figure]:
    """Every chart, keyed like ``CHARTS``; ``run`` is the current run (default: the latest in ``rows``)."""
    span = version_span(rows)
    return {name: BUILDERS[name](rows, run, span) for name in CHARTS}


TABLE_COLUMNS = ["version", "algo", "by", "case", "loss", "KL", "margin/R", "acc", "safety", "accept", "s"]


def updates_table(rows: list[dict], last: int = 8) -> list[list]:
    """The last updates, newest first, as rows for a compact table."""
    def fmt(v, digits=3):
        return round(v, digits) if _ok(v) else None

    out = []
    for r in [r for r in rows if r["kind"] == "update"][-last:][::-1]:
        reward = r.get("rewards/margins") if r.get("algorithm") == "dpo" else r.get("reward")
        out.append([
            f"{r['version_before']} → {r['version']}", r.get("algorithm", "").upper(), r.get("annotator", ""),
            r.get("case_id", ""), fmt(r.get("loss"), 4), fmt(r.get("kl"), 4), fmt(reward),
            fmt(r.get("rewards/accuracies"), 2), fmt(r.get("safety_ranked"), 2),
            fmt(r.get("acceptance_rate"), 2), fmt(r.get("seconds"), 1),
        ])
    return out


def belief_figure(reference: dict | None, policy: dict | None, version: int = 0) -> go.Figure:
    """Bars: P(candidate) under the reference and the current policy (``belief.belief``),
    the correct diagnosis marked."""
    fig = go.Figure()
    if reference is None or policy is None:
        fig.update_layout(template="plotly_white", height=220, margin={"l": 12, "r": 12, "t": 40, "b": 12},
                          title={"text": "What the model believes about this case", "font": {"size": 14}, "x": 0.02})
        fig.add_annotation(text="Pick a case", showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                           font={"color": "#94a3b8", "size": 12})
        fig.update_xaxes(visible=False)
        fig.update_yaxes(visible=False)
        return fig
    names = [("✓ " if i == policy["correct"] else "") + (n if len(n) <= 38 else n[:36] + "…")
             for i, n in enumerate(policy["names"])]
    fig.add_trace(go.Bar(y=names, x=reference["probs"], orientation="h", name="reference (v0)",
                         marker={"color": COLORS["old"]}, hovertemplate="%{y}<br>reference %{x:.1%}<extra></extra>"))
    fig.add_trace(go.Bar(y=names, x=policy["probs"], orientation="h", name=f"policy now (v{version})",
                         marker={"color": COLORS["a"]}, hovertemplate="%{y}<br>policy %{x:.1%}<extra></extra>"))
    change = policy["p_correct"] - reference["p_correct"]
    fig.update_layout(
        barmode="group", template="plotly_white", height=110 + 34 * len(names),
        margin={"l": 12, "r": 12, "t": 52, "b": 56},
        title={"text": "What the model believes about this case<br><sup style='color:#64748b'>"
                       f"P(correct) {reference['p_correct']:.1%} at v0 → {policy['p_correct']:.1%} now "
                       f"({change:+.1%}); scored, not sampled</sup>", "font": {"size": 14}, "x": 0.02},
        legend={"orientation": "h", "yanchor": "top", "y": -0.12, "x": 0, "font": {"size": 10}},
        font={"family": "system-ui, -apple-system, Segoe UI, sans-serif", "size": 11},
    )
    fig.update_xaxes(tickformat=".0%", range=[0, 1])
    fig.update_yaxes(autorange="reversed", automargin=True)
    return fig
