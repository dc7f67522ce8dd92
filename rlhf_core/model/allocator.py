"""Run the process on jemalloc (or tcmalloc) when the system has one.

A training step on CPU allocates thousands of 1-4 MB tensors with mixed
lifetimes (~20 GB of allocations per update on SmolLM2). glibc's malloc
fragments badly under that pattern: measured on a LoRA update, live tensors
peaked 0.17 GB above the pre-update level but resident memory grew by 0.8 GB,
and stayed there. With jemalloc or tcmalloc the same update grows resident
memory by 0.29 GB; an interleaved A/B put our update step ~5-8% slower on
jemalloc (within this VM's noise), while TRL's step ran ~30% faster. (Forcing
glibc to mmap the tensors instead fixes the memory but costs ~50% more update
time in page faults.)

The other way round, glibc told to keep what it frees (arenas capped, mmap threshold
32 MB, no trimming) ends the page faults jemalloc costs (it hands every freed block of
8 MB or more back to the kernel, ~3 GiB an update at ~0.5 s/GiB): updates ran 9-25%
faster in four of five alternating pairings (equal in one), but the app's resident
memory after five generate + update rounds over the API was 6.0 GB against 2.0 GB on
jemalloc, as every thread's high-water mark stays. Not worth it; measured 2026-12-07
(issue 12's closing note).

Without either library, glibc is capped at two malloc arenas (``MALLOC_ARENA_MAX``):
glibc gives each thread that allocates its own arena, up to 8 per core, and every
arena keeps its own fragmented free memory. The control room runs model work on
many threads (a worker per engine job, Gradio's handler threads). Measured on
this VM with the default model, five generate + update rounds over the API: resident
memory 4.1 → 9.1 GB uncapped and still growing (a browser session reached 16.8 GB
after six updates), 3.9 → 4.6 GB capped (the engine alone, on one thread: 4.2 GB).
``MALLOC_ARENA_MAX`` set by the user is left as it is.

The allocator is fixed when a process starts, so ``use_preferred_allocator``
re-executes the entry point once with ``LD_PRELOAD`` (or the arena cap) set.
Linux only. ``RLHF_MALLOC=system`` keeps glibc untouched;
``RLHF_MALLOC=/path/to/lib.so`` picks a library.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

SWITCH = "RLHF_MALLOC"  # "auto" (default) | "system" | path of an allocator library
MARKER = "RLHF_MALLOC_PRELOADED"  # set in the re-executed process, so it never loops
LIBRARIES = ("libjemalloc.so.2", "libtcmalloc_minimal.so.4")  # Debian: libjemalloc2, libtcmalloc-minimal4
ARENAS = "MALLOC_ARENA_MAX"  # glibc's cap on per-thread malloc arenas
GLIBC_ARENAS = "2"
LIBRARY_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_allocator(setting: str = "auto", dirs: tuple[str, ...] = LIBRARY_DIRS) -> str | None:
    """Path of the allocator library to preload, or None for glibc's malloc."""
    if setting == "system":
        return None
    if setting not in ("", "auto"):
        if not Path(setting).is_file():
            raise ValueError(f"{SWITCH}={setting!r}: no such library (use 'auto', 'system' or a path to a .so file)")
        return setting
    for directory in dirs:
        for name in LIBRARIES:
            path = Path(directory) / name
            if path.is_file():
                return str(path)
    return None


def preload_environment(env: Mapping[str, str], dirs: tuple[str, ...] = LIBRARY_DIRS) -> dict[str, str] | None:
    """The environment to re-execute with, or None when the process should go on as it is."""
    if env.get(MARKER) or not sys.platform.startswith("linux"):
        return None
    library = find_allocator(env.get(SWITCH, "auto"), dirs)
    if library is None:  # glibc: cap its arenas, unless told to leave it alone
        if env.get(SWITCH) == "system" or ARENAS in env:
            return None
        return {**env, ARENAS: GLIBC_ARENAS, MARKER: f"glibc malloc ({ARENAS}={GLIBC_ARENAS})"}
    preloaded = env.get("LD_PRELOAD", "")
    if any(Path(p).name == Path(library).name for p in preloaded.split()):
        return None
    new = dict(env)
    new["LD_PRELOAD"] = f"{library} {preloaded}".strip()
    new[MARKER] = library
    return new


def use_preferred_allocator() -> None:
    """Re-execute this process (same interpreter and arguments) with the allocator
    preloaded; returns without doing anything when that is not needed or possible."""
    try:
        env = preload_environment(os.environ)
    except ValueError as err:
        log.warning("%s; keeping the system allocator", err)
        return
    if env is None:
        return
    log.info("restarting on %s (set %s=system to keep glibc malloc)", env[MARKER], SWITCH)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
