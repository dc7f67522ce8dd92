"""Look and feel: a restrained theme (local fonts only, nothing fetched) and a little CSS.
Gradio 6 takes both at launch time: ``demo.launch(**LAUNCH_STYLE)``."""
from __future__ import annotations

import gradio as gr

SYSTEM_FONTS = ["Inter", "ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Roboto", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]

CSS = """
.gradio-container { max-width: 1480px !important; }
.cr-header { display:flex; justify-content:space-between; align-items:center; flex-wrap:wrap; gap:8px;
  padding:10px 14px; border:1px solid var(--border-color-primary); border-radius:10px;
  background: linear-gradient(90deg, #f0fdfa, #f8fafc); }
.cr-title { font-size:1.15rem; font-weight:700; color:#134e4a; }
.cr-header-facts { display:flex; flex-wrap:wrap; gap:6px; }
.cr-muted { color:#64748b; font-weight:400; font-size:0.85em; }
/* toasts at the bottom left, over the narrow controls column, never over the charts (right) */
.toast-wrap { top:auto !important; bottom:var(--size-4) !important; left:var(--size-3) !important; right:auto !important; align-items:start !important; width:min(24rem, 90vw) !important; }
.cr-glossary { display:grid; grid-template-columns:max-content 1fr; gap:4px 14px; font-size:0.88em; margin:0; }
.cr-glossary dt { font-weight:600; color:#0f766e; }
.cr-glossary dd { margin:0; color:#334155; }
.cr-badge { display:inline-block; padding:1px 8px; border-radius:999px; font-size:0.78rem; font-weight:600;
  border:1px solid transparent; white-space:nowrap; }
.cr-accepted { background:#dcfce7; color:#166534; border-color:#bbf7d0; }
.cr-rationalised { background:#fef3c7; color:#92400e; border-color:#fde68a; }
.cr-rejected { background:#fee2e2; color:#991b1b; border-color:#fecaca; }
.cr-pending { background:#e2e8f0; color:#334155; }
.cr-hard, .cr-sev-hard { background:#991b1b; color:#fff; }
.cr-sev-soft, .cr-warn { background:#fef3c7; color:#92400e; }
.cr-safety-ok, .cr-ok { background:#ecfdf5; color:#065f46; border-color:#a7f3d0; }
.cr-safety-warn { background:#fffbeb; color:#92400e; border-color:#fde68a; }
.cr-safety-bad { background:#fef2f2; color:#991b1b; border-color:#fecaca; }
.cr-chip, .cr-id { background:#f1f5f9; color:#334155; border-color:#e2e8f0; font-weight:500; }
.cr-version { background:#134e4a; color:#fff; }
.cr-card { border:1px solid var(--border-color-primary) !important; border-radius:10px !important; }
.cr-card-head { padding:2px 2px 4px 2px; }
.cr-card textarea, .cr-card input { border:1px solid #e2e8f0 !important; box-shadow:none !important; }
.cr-card textarea:disabled { background:#fcfcfd !important; color:#0f172a !important; -webkit-text-fill-color:#0f172a; }
.cr-card-title { display:flex; align-items:center; gap:6px; flex-wrap:wrap; }
.cr-rank { background:#134e4a; color:#fff; border-radius:6px; padding:0 6px; font-weight:700; }
.cr-dx { margin-top:4px; }
.cr-change { margin-top:4px; font-size:0.86rem; border-radius:6px; padding:2px 6px; display:inline-block; }
.cr-change-up { background:#dcfce7; color:#14532d; }
.cr-change-down { background:#fee2e2; color:#7f1d1d; }
.cr-reason { margin-top:2px; font-size:0.86rem; color:#334155; }
.cr-violations { margin:4px 0 0 0; padding-left:18px; font-size:0.84rem; }
.cr-evidence { color:#64748b; font-style:italic; }
.cr-rej-item { border-bottom:1px solid var(--border-color-primary); padding:4px 0; }
.cr-rej-item summary { cursor:pointer; }
.cr-pre { white-space:pre-wrap; font-family:ui-monospace, monospace; font-size:0.82rem; background:#f8fafc;
  padding:8px; border-radius:6px; max-height:260px; overflow:auto; }
.cr-progress { padding:4px 0; }
.cr-progress-label { font-size:0.88rem; margin-bottom:4px; }
.cr-bar { height:8px; background:#e2e8f0; border-radius:999px; overflow:hidden; }
.cr-bar-fill { height:100%; background:#0f766e; transition: width .25s ease; }
.cr-progress-done .cr-bar-fill { background:#15803d; }
.cr-progress-error .cr-bar-fill { background:#b91c1c; }
.cr-progress-idle .cr-bar-fill { background:#cbd5e1; }
.cr-status { padding:6px 10px; border-radius:8px; font-size:0.9rem; }
.cr-status-info { background:#f1f5f9; color:#334155; }
.cr-status-ok { background:#ecfdf5; color:#065f46; }
.cr-status-error { background:#fef2f2; color:#991b1b; }
.cr-status-warn { background:#fffbeb; color:#92400e; }
.cr-case-meta { font-size:0.88rem; display:flex; flex-direction:column; gap:4px; }
.cr-answer summary { cursor:pointer; color:#0f766e; }
.cr-section-title { font-weight:700; font-size:1rem; color:#0f172a; margin:2px 0; }
#ranking-list label { width:100%; }
.cr-confirm { border:2px solid #f59e0b !important; background:#fffbeb !important; border-radius:10px !important; }
.cr-mono textarea { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, monospace !important; font-size:0.82rem !important; }
"""


def theme() -> gr.themes.Base:
    return gr.themes.Default(
        primary_hue="teal", secondary_hue="slate", neutral_hue="slate", radius_size="md",
        font=SYSTEM_FONTS, font_mono=MONO_FONTS,
    )


def launch_style() -> dict:
    """Keyword arguments for ``Blocks.launch`` (Gradio 6 takes theme and CSS there)."""
    return {"theme": theme(), "css": CSS}
