"""Build the Docker image with podman, start the app from it and check the page and one API call.

    python -m bench.docker_check [--base IMAGE] [--no-readme]      (make docker-check)

For machines without a Docker engine (these development machines): Debian's ``podman build
--isolation chroot`` builds the Dockerfile as it is. Where the base image cannot be pulled,
``--from`` replaces it with a bookworm + python3.11 root made here by ``debootstrap`` (it
trusts this machine's CA certificates, so pip and apt inside the build reach their registries
through the same proxy). ``podman run`` cannot start containers here (rlimits, cgroups), so the
smoke test runs the built image's own filesystem: a container is created and mounted, and its
CMD runs under ``chroot`` as the image's user, with the image's ENV and working directory, on a
loopback port. Then: the page must be served with the app's title, and ``/metrics`` (through
``gradio_client``) must report the bundled default model at version 0. README's "docker check"
block records what was verified and when.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

from .common import write_readme_block

ROOT = Path(__file__).resolve().parents[1]
UPSTREAM_BASE = "docker.io/library/python:3.11-slim-bookworm"  # the Dockerfile's FROM
LOCAL_BASE = "localhost/bookworm-python:3.11"
IMAGE = "localhost/rlhf-control-room:check"
BEGIN, END = "<!-- BEGIN docker check -->", "<!-- END docker check -->"
HOST_CAS = Path("/usr/local/share/ca-certificates")


def podman(*args: str, capture: bool = False, check: bool = True) -> str:
    out = subprocess.run(["podman", *args], check=check, text=True,
                         stdout=subprocess.PIPE if capture else None)
    return (out.stdout or "").strip()


def image_exists(name: str) -> bool:
    return subprocess.run(["podman", "image", "exists", name]).returncode == 0


def base_image(requested: str | None) -> tuple[str, str]:
    """The image to build from, and how it was obtained."""
    if requested:
        return requested, "given with --base"
    if subprocess.run(["podman", "pull", "-q", UPSTREAM_BASE], capture_output=True).returncode == 0:
        return UPSTREAM_BASE, "pulled"
    if image_exists(LOCAL_BASE):
        return LOCAL_BASE, "debootstrap (made earlier on this machine)"
    with tempfile.TemporaryDirectory(prefix="rlhf-base-") as tmp:
        root = Path(tmp) / "rootfs"
        subprocess.run(["debootstrap", "--variant=minbase", "--include=python3,python3-venv,ca-certificates",
                        "bookworm", str(root), "http://deb.debian.org/debian"], check=True, stdout=subprocess.DEVNULL)
        if HOST_CAS.is_dir():
            for cert in HOST_CAS.glob("*.crt"):
                shutil.copy(cert, root / "usr/local/share/ca-certificates" / cert.name)
            subprocess.run(["chroot", str(root), "update-ca-certificates"], check=True, stdout=subprocess.DEVNULL)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        subprocess.run(["podman", "import", "--change", "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt",
                        "--change", "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                        "-", LOCAL_BASE], stdin=tar.stdout, check=True, stdout=subprocess.DEVNULL)
        tar.wait()
    return LOCAL_BASE, "debootstrap (bookworm, python3.11)"


def local_torch_wheels() -> Path | None:
    """A folder in pip's find-links that holds the CPU torch wheel the Makefile pins."""
    for folder in os.environ.get("PIP_FIND_LINKS", "/opt/wheels").split():
        if list(Path(folder).glob("torch-2.13.0+cpu-*.whl")):
            return Path(folder)
    return None


@contextlib.contextmanager
def served(folder: Path):
    """``folder`` over HTTP on a loopback port (pip's --find-links reads the listing)."""
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args) -> None:  # pip asks many times; nothing worth printing
            pass

    handler = functools.partial(Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()


def build(base: str) -> tuple[float, str]:
    """Build the Dockerfile from ``base``; seconds taken and where torch came from."""
    args = ["build", "--isolation", "chroot", "--network", "host", "--from", base, "-t", IMAGE]
    wheels = local_torch_wheels()
    start = time.perf_counter()
    if wheels is None:
        podman(*args, str(ROOT))
        return time.perf_counter() - start, "the Dockerfile's default (download.pytorch.org CPU index)"
    with served(wheels) as url:
        podman(*args, "--build-arg", "TORCH_INDEX_URL=", "--build-arg", f"TORCH_FIND_LINKS={url}", str(ROOT))
    return time.perf_counter() - start, "TORCH_FIND_LINKS: this machine's CPU wheel, served on loopback"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_config(image: str) -> dict:
    return json.loads(podman("image", "inspect", "--format", "{{json .Config}}", image, capture=True))


@contextlib.contextmanager
def mounted_container(image: str):
    """A container of ``image`` created (not started) and mounted; its root path."""
    container = podman("create", image, capture=True).splitlines()[-1]
    root = Path(podman("mount", container, capture=True))
    binds = [root / d for d in ("proc", "sys", "dev")]
    try:
        for target in binds:
            subprocess.run(["mount", "--rbind", f"/{target.name}", str(target)], check=True)
        yield root
    finally:
        for target in reversed(binds):
            subprocess.run(["umount", "-R", "-l", str(target)], check=False)
        podman("umount", container, check=False, capture=True)
        podman("rm", "-f", container, check=False, capture=True)


def smoke_test(image: str, timeout: float = 300.0) -> dict:
    """Run the image's CMD from its own filesystem; check the page and ``/metrics``."""
    from gradio_client import Client

    config = image_config(image)
    port = free_port()
    env = dict(e.split("=", 1) for e in config.get("Env") or [])
    env.update(PORT=str(port), GRADIO_SERVER_NAME="127.0.0.1", HOME="/home/app")
    user = config.get("User") or "root"
    workdir = config.get("WorkingDir") or "/"
    cmd = config["Cmd"]
    with mounted_container(image) as root:
        uid = subprocess.run(["chroot", str(root), "id", "-u", user], check=True, capture_output=True,
                             text=True).stdout.strip()
        shell = f"cd {workdir} && exec " + " ".join(cmd)
        log = tempfile.NamedTemporaryFile("w+", prefix="rlhf-image-", suffix=".log", delete=False)
        proc = subprocess.Popen(["chroot", f"--userspec={uid}:{uid}", str(root), "/usr/bin/env", "-i",
                                 *(f"{k}={v}" for k, v in env.items()), "/bin/sh", "-c", shell],
                                stdout=log, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{port}/"
        start = time.perf_counter()
        try:
            page = None
            while time.perf_counter() - start < timeout and proc.poll() is None:
                try:
                    page = urllib.request.urlopen(url, timeout=5).read().decode()
                    break
                except OSError:
                    time.sleep(2)
            if page is None:
                log.seek(0)
                raise SystemExit(f"the app in the image did not serve {url} within {timeout:.0f} s:\n{log.read()[-4000:]}")
            ready = time.perf_counter() - start
            metrics = Client(url, verbose=False).predict(api_name="/metrics")
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    model = metrics["model"]
    checks = {
        "page": "RLHF control room" in page,
        "model": model.get("model") == "smollm2-135m",
        "version 0": model.get("version") == 0,
    }
    if not all(checks.values()):
        raise SystemExit(f"the image's app answered, but checks failed: {checks}; /metrics model: {model}")
    return {"ready_s": ready, "model": model, "user": user, "uid": uid, "cmd": " ".join(cmd)}


def image_size(image: str) -> str:
    size = int(podman("image", "inspect", "--format", "{{.Size}}", image, capture=True))
    return f"{size / 2**30:.2f} GiB"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help=f"image to build from (default: pull {UPSTREAM_BASE}, else debootstrap one)")
    p.add_argument("--no-build", action="store_true", help=f"check the {IMAGE} built before")
    p.add_argument("--no-readme", action="store_true", help="do not rewrite README's docker check block")
    args = p.parse_args(argv)
    if shutil.which("podman") is None:
        raise SystemExit("podman is not installed (Debian: apt-get install podman buildah debootstrap)")
    if args.no_build:
        base, how, build_s, torch_from = "(built before)", "", float("nan"), "(built before)"
    else:
        base, how = base_image(args.base)
        build_s, torch_from = build(base)
    result = smoke_test(IMAGE)
    model = result["model"]
    text = (
        f"Verified on {datetime.now(timezone.utc):%Y-%m-%d} with `make docker-check` (podman "
        f"{podman('version', '--format', '{{.Client.Version}}', capture=True)}, `build --isolation chroot`): "
        f"base `{base}` ({how}); torch from {torch_from}; built in {build_s / 60:.1f} min, image {image_size(IMAGE)}. "
        f"The image's CMD (`{result['cmd']}`) ran from its own filesystem as user `{result['user']}` "
        f"(uid {result['uid']}) with its ENV: the page was served after {result['ready_s']:.0f} s and "
        f"`/metrics` answered model `{model['model']}` ({model.get('mode')}), version {model['version']}."
    )
    print(text)
    if not args.no_readme:
        write_readme_block(text, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
