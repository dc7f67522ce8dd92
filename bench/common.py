"""Shared helpers for the benchmarks: timing, memory, the benchmark case."""
from __future__ import annotations

import json
import os
import platform
import re
import resource
import statistics
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from rlhf_core.clinical.cases import Case  # noqa: E402

# ~120 prompt tokens with the chat template and system prompt on SmolLM2
BENCH_CASE = Case(
    id="bench-pe",
    question=(
        "A 58-year-old woman is brought in five days after an elective right hip replacement. She "
        "reports sudden pleuritic chest pain and breathlessness that began an hour ago. Heart rate "
        "is 118/min, blood pressure 104/68 mmHg, oxygen saturation 89% on room air, and her left "
        "calf is swollen and tender. What is the most likely diagnosis?"
    ),
    answer="pulmonary embolism",
    aliases=["PE"],
)


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def median(xs):
    return statistics.median(xs)


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GiB (Linux ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_model() -> str:
    """The CPU's model name (Linux), else the platform's processor string: which
    kernels a BLAS library picks, and so every CPU figure, depends on it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    from rlhf_core.model.allocator import MARKER

    malloc = Path(os.environ[MARKER]).name.split(".so")[0].removeprefix("lib") if os.environ.get(MARKER) else "glibc malloc"
    return (f"{cpu_model()} ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads, {malloc}")


def save_json(data, path: str | None) -> None:
    """Write benchmark results to ``path`` (when given) as indented JSON."""
    if path:
        with open(path, "w") as fh:
            json.dump(data, fh, indent=2)


README = Path(__file__).resolve().parents[1] / "README.md"


def write_readme_block(text: str, begin: str, end: str, append_if_missing: bool = False) -> None:
    """Replace README's block between the ``begin`` and ``end`` markers with ``text``
    (benchmarks rewrite their figures, nobody edits them by hand)."""
    content = README.read_text()
    block = f"{begin}\n{text}\n{end}"
    if begin in content:
        content = re.sub(re.escape(begin) + ".*?" + re.escape(end), lambda _: block, content, flags=re.S)
    elif append_if_missing:
        content += "\n" + block + "\n"
    else:
        raise SystemExit(f"README.md has no {begin} marker")
    README.write_text(content)


def publish(result: dict, json_out: str | None, render, begin: str, end: str) -> dict:
    """Save a benchmark's ``result`` to ``json_out`` and rewrite README's block from it (``render(result)``)."""
    save_json(result, json_out)
    write_readme_block(render(result), begin, end)
    return result


def republish(json_out: str, render, begin: str, end: str) -> dict:
    """``--no-run``: rewrite README's block from the result stored in ``json_out``."""
    result = load_json(json_out)
    write_readme_block(render(result), begin, end)
    return result


def load_json(path: str):
    with open(path) as fh:
        return json.load(fh)


def adapter_label(mode: str, adapted_layers: float | None) -> str:
    """How a run trained: "full fine-tuning", or LoRA and on which layers (results stored
    before ``adapted_layers`` was recorded had adapters on every layer)."""
    if mode not in ("lora", "LoRA"):
        return "full fine-tuning"
    share = adapted_layers or 1.0
    if share >= 1.0:
        return "LoRA on every layer"
    return "LoRA on the top half of the layers" if share == 0.5 else f"LoRA on the top {share:.0%} of the layers"
