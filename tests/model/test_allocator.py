import subprocess
import sys
from pathlib import Path

import pytest

from rlhf_core.model.allocator import ARENAS, MARKER, SWITCH, find_allocator, preload_environment

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="LD_PRELOAD is a Linux mechanism")


def fake_library(tmp_path: Path, name: str = "libjemalloc.so.2") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\x7fELF")
    return path


def test_finds_jemalloc_before_tcmalloc_and_nothing_in_empty_dirs(tmp_path):
    assert find_allocator("auto", (str(tmp_path),)) is None
    tc = fake_library(tmp_path, "libtcmalloc_minimal.so.4")
    assert find_allocator("auto", (str(tmp_path),)) == str(tc)
    je = fake_library(tmp_path)
    assert find_allocator("auto", (str(tmp_path),)) == str(je)
    assert find_allocator("system", (str(tmp_path),)) is None
    with pytest.raises(ValueError, match="no such library"):
        find_allocator(str(tmp_path / "missing.so"))


@linux_only
def test_preload_environment_once_and_never_twice(tmp_path):
    je = fake_library(tmp_path)
    dirs = (str(tmp_path),)
    env = preload_environment({"PATH": "/bin", "LD_PRELOAD": "/x/libother.so"}, dirs)
    assert env["LD_PRELOAD"] == f"{je} /x/libother.so" and env[MARKER] == str(je) and env["PATH"] == "/bin"
    assert preload_environment(env, dirs) is None  # the restarted process goes on
    assert preload_environment({"LD_PRELOAD": "/elsewhere/libjemalloc.so.2"}, dirs) is None  # preloaded by the user
    assert preload_environment({SWITCH: "system"}, dirs) is None


@linux_only
def test_without_a_library_glibc_is_capped_at_two_arenas_once():
    env = preload_environment({"PATH": "/bin"}, ())  # nothing installed: glibc it is, with few arenas
    assert env[ARENAS] == "2" and "LD_PRELOAD" not in env and env["PATH"] == "/bin" and env[MARKER]
    assert preload_environment(env, ()) is None  # the restarted process goes on
    assert preload_environment({ARENAS: "8"}, ()) is None  # the user's own setting stays
    assert preload_environment({SWITCH: "system"}, ()) is None  # glibc untouched


@linux_only
def test_use_preferred_allocator_restarts_the_process_once_with_the_library_loaded(tmp_path):
    # libm stands in for jemalloc: a real shared library that is harmless to preload
    libm = next((p for p in ("/lib/x86_64-linux-gnu/libm.so.6", "/lib/aarch64-linux-gnu/libm.so.6", "/lib64/libm.so.6")
                 if Path(p).is_file()), None)
    if libm is None:
        pytest.skip("no libm found at a known path")
    script = tmp_path / "entry.py"
    script.write_text(
        "import os, sys\n"
        "print('start', flush=True)\n"
        "from rlhf_core.model.allocator import use_preferred_allocator\n"
        "use_preferred_allocator()\n"
        f"print('preloaded', os.environ.get('LD_PRELOAD'), os.environ.get('{MARKER}'), sys.argv[1:])\n"
    )
    env = {"PATH": "/usr/bin:/bin", SWITCH: libm, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    out = subprocess.run([sys.executable, str(script), "--flag", "x"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines.count("start") == 2  # ran, restarted once, no loop
    assert lines[-1] == f"preloaded {libm} {libm} ['--flag', 'x']"
