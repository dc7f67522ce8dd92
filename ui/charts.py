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
    "loss": "Loss",
    "kl": "KL from the reference",
    "rewards": "Rewards",
    "accuracy": "Ranking accuracy",
    "safety": "Safety score",
    "acceptance": "Acceptance rate",
}
COLORS = {"a": "#0f766e", "b": "#b45309", "c": "#1d4ed8", "d": "#7c3aed", "old": "#cbd5e1"}
EMPTY_HINT = {
    "loss": "No updates yet",
    "kl": "No updates yet",
    "rewards": "No updates yet",
    "accuracy": "No DPO updates yet",
    "safety": "No traces sampled yet",
    "acceptance": "No traces sampled yet",
}


def _ok(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _points(rows: list[dict], kind: str, key: str, run: int, algorithm: str | None = None):
    xs, ys = [], []
    for r in rows:
        if r["kind"] == kind and r["run"] == run and _ok(r.get(key)) and (algorithm is None or r.get("algorithm") == algorithm):
            xs.append(r["x"] if "x" in r else r["version"])
            ys.append(r[key])
    return xs, ys


def _series(fig: go.Figure, rows: list[dict], key: str, name: str, color: str, current: int,
            kind: str = "update", algorithm: str | None = None, steps: bool = True) -> None:
    """Markers+line for ``kind`` records of every run, with per-step points for the current run."""
    for run in sorted({r["run"] for r in rows}):
        xs, ys = _points(rows, kind, key, run, algorithm)
        if not xs:
            continue
        old = run != current
        fig.add_trace(go.Scatter(
            x=xs, y=ys, mode="lines+markers", name=f"{name} (run {run})" if old else name,
            line={"color": COLORS["old"] if old else color, "width": 1.5 if old else 2.5},
            marker={"size": 5 if old else 8},
            legendgroup=name, hovertemplate=f"{name}<br>version %{{x}}<br>%{{y:.4g}}<extra></extra>",
        ))
    if steps:
        xs, ys = _points(rows, "step", key, current, algorithm)
        if xs:
            fig.add_trace(go.Scatter(
                x=xs, y=ys, mode="markers", name=f"{name} per step", legendgroup=name, showlegend=False,
                marker={"color": color, "size": 5, "opacity": 0.45, "symbol": "circle-open"},
                hovertemplate=f"{name} (step)<br>version %{{x:.2f}}<br>%{{y:.4g}}<extra></extra>",
            ))


def _layout(fig: go.Figure, title: str, ytitle: str, empty: str | None, yrange=None) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.02, "y": 0.96, "font": {"size": 14}},
        template="plotly_white", height=250, margin={"l": 48, "r": 12, "t": 36, "b": 40},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.0, "xanchor": "right", "x": 1, "font": {"size": 10},
                "bgcolor": "rgba(255,255,255,0.6)"},
        font={"family": "system-ui, -apple-system, Segoe UI, sans-serif", "size": 11},
        hovermode="closest", showlegend=len(fig.data) > 1,
    )
    xs = [x for trace in fig.data for x in (trace.x or ())]
    if xs:  # pad the version axis so a single point is not on the edge; integer ticks
        lo, hi = min(xs), max(xs)
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


def loss_figure(rows: list[dict], run: int | None = None) -> go.Figure:
    run = run or current_run(rows)
    fig = go.Figure()
    _series(fig, rows, "loss", "loss", COLORS["a"], run)
    return _layout(fig, CHARTS["loss"], "loss", EMPTY_HINT["loss"])


def kl_figure(rows: list[dict], run: int | None = None) -> go.Figure:
    run = run or current_run(rows)
    fig = go.Figure()
    _series(fig, rows, "kl", "KL", COLORS["c"], run, steps=False)
    return _layout(fig, CHARTS["kl"], "nats / token", EMPTY_HINT["kl"])


def rewards_figure(rows: list[dict], run: int | None = None) -> go.Figure:
    run = run or current_run(rows)
    fig = go.Figure()
    _series(fig, rows, "rewards/chosen", "DPO chosen", COLORS["a"], run, algorithm="dpo")
    _series(fig, rows, "rewards/rejected", "DPO rejected", COLORS["b"], run, algorithm="dpo")
    _series(fig, rows, "rewards/margins", "DPO margin", COLORS["c"], run, algorithm="dpo")
    _series(fig, rows, "reward", "GRPO mean reward", COLORS["d"], run, algorithm="grpo")
    return _layout(fig, CHARTS["rewards"], "reward", EMPTY_HINT["rewards"])


def accuracy_figure(rows: list[dict], run: int | None = None) -> go.Figure:
    run = run or current_run(rows)
    fig = go.Figure()
    _series(fig, rows, "rewards/accuracies", "DPO pairs ordered as ranked", COLORS["a"], run, algorithm="dpo")
    return _layout(fig, CHARTS["accuracy"], "accuracy", EMPTY_HINT["accuracy"], yrange=[-0.05, 1.05])


def safety_figure(rows: list[dict], run: int | None = None) -> go.Figure:
    run = run or current_run(rows)
    fig = go.Figure()
    _series(fig, rows, "safety_accepted", "accepted traces", COLORS["a"], run, kind="generation", steps=False)
    _series(fig, rows, "safety_all", "all sampled", COLORS["b"], run, kind="generation", steps=False)
    return _layout(fig, CHARTS["safety"], "mean safety score", EMPTY_HINT["safety"], yrange=[-0.05, 1.05])


def acceptance_figure(rows: list[dict], run: int | None = None) -> go.Figure:
    run = run or current_run(rows)
    fig = go.Figure()
    _series(fig, rows, "acceptance_rate", "verifier acceptance", COLORS["c"], run, kind="generation", steps=False)
    return _layout(fig, CHARTS["acceptance"], "accepted / sampled", EMPTY_HINT["acceptance"], yrange=[-0.05, 1.05])


BUILDERS = {
    "loss": loss_figure,
    "kl": kl_figure,
    "rewards": rewards_figure,
    "accuracy": accuracy_figure,
    "safety": safety_figure,
    "acceptance": acceptance_figure,
}


def all_figures(rows: list[dict], run: int | None = None) -> dict[str, go.Figure]:
    """Every chart, keyed like ``CHARTS``; ``run`` is the current run (default: the latest in ``rows``)."""
    return {name: build(rows, run) for name, build in BUILDERS.items()}


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
