"""Python venv: create <repo>/.venv, install qemu/pins/requirements.lock with --require-hashes, then
the repository itself editable (--no-deps, --no-build-isolation: setuptools is pinned in the lock).

The target can be moved with --venv PATH or HARNESS_VENV (used to test against a throwaway venv).
"""

from __future__ import annotations

import json
import re
import sys
import urllib.request
from pathlib import Path

from harness.deps.common import (
    Context,
    DepsError,
    StepResult,
    log,
    read_stamp,
    run,
    sha256_file,
    write_stamp,
)

LOCK = "requirements.lock"
STAMP = ".harness-stamp.json"
IMPORTS = ("cffi", "pyroute2", "qemu.qmp", "numpy", "tqdm", "pytest", "hypothesis", "mypy")
LOCAL_INDEXES = (Path("/opt/pypi/simple"), Path("/opt/pypi-more/simple"))
_REQ_RE = re.compile(r"^([A-Za-z0-9_.\-]+)==([^\s\\;]+)")


def parse_lock(text: str) -> dict[str, tuple[str, list[str]]]:
    """name -> (version, sha256 hashes) from a pip requirements file with --hash options."""
    out: dict[str, tuple[str, list[str]]] = {}
    for entry in text.replace("\\\n", " ").splitlines():
        entry = entry.split("#", 1)[0].strip()
        if not entry:
            continue
        m = _REQ_RE.match(entry)
        if not m:
            raise DepsError(f"{LOCK}: cannot parse {entry!r}")
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", entry)
        if not hashes:
            raise DepsError(f"{LOCK}: {m.group(1)} has no --hash")
        out[_norm(m.group(1))] = (m.group(2), hashes)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def python_bin(venv: Path) -> Path:
    return venv / "bin" / "python"


def ensure(ctx: Context) -> StepResult:
    lock = ctx.pins / LOCK
    parse_lock(lock.read_text())  # fail early on a malformed lock
    venv = ctx.venv
    py = python_bin(venv)
    # pyproject.toml too: its entry points (the harness command, the pytest plugin) are only
    # registered by the editable install.
    want = {"lock": sha256_file(lock), "python": sys.version.split()[0], "repo": str(ctx.repo),
            "pyproject": sha256_file(ctx.repo / "pyproject.toml")}
    if py.exists() and read_stamp(venv / STAMP) == want:
        _smoke(py)
        return StepResult("venv (requirements.lock)", str(venv), "cached")
    if ctx.check:
        raise DepsError(f"venv {venv} is missing or was not installed from {lock}")
    if not py.exists():
        log(f"creating venv {venv}")
        run([sys.executable, "-m", "venv", venv])
    pip = [str(py), "-m", "pip", "--disable-pip-version-check"]
    log(f"pip install --require-hashes -r {lock.name}")
    run([*pip, "install", "--require-hashes", "--only-binary=:all:", "-r", lock])
    run([*pip, "install", "--no-deps", "--no-build-isolation", "-e", ctx.repo])
    _smoke(py)
    write_stamp(venv / STAMP, want)
    return StepResult("venv (requirements.lock)", str(venv), "installed")


def _smoke(py: Path) -> None:
    code = "import " + ", ".join(IMPORTS) + ", harness"
    cp = run([py, "-c", code], check=False)
    if cp.returncode != 0:
        raise DepsError(f"venv smoke import failed ({code}):\n{cp.stdout}")


# --- relock (maintainer tool) -----------------------------------------------------------------


def _pypi_hashes(name: str, version: str) -> list[str]:
    url = f"https://pypi.org/pypi/{name}/json"
    with urllib.request.urlopen(url, timeout=60) as r:
        data = json.load(r)
    files = data.get("releases", {}).get(version)
    if files is None:
        newest = data.get("info", {}).get("version")
        raise DepsError(f"{name}=={version} is not on PyPI (newest: {newest})")
    return [f["digests"]["sha256"] for f in files if f.get("digests", {}).get("sha256")]


def _local_hashes(name: str, version: str) -> list[str]:
    """Hashes of files the machine's extra local indexes serve for name==version."""
    out = []
    for idx in LOCAL_INDEXES:
        page = idx / _norm(name) / "index.html"
        if not page.exists():
            continue
        for href, fname in re.findall(r'href="([^"]+)">([^<]+)</a>', page.read_text()):
            m = re.match(r"(.+?)-(\d[^-]*?)(?:-|\.tar\.gz$|\.zip$)", fname)
            sha = re.search(r"sha256=([0-9a-f]{64})", href)
            if m and sha and _norm(m.group(1)) == _norm(name) and m.group(2) == version:
                out.append(sha.group(1))
    return out


def relock(ctx: Context, pins: dict[str, str]) -> Path:
    """Write requirements.lock: name==version pins with every hash PyPI or a local index serves."""
    lines = [
        "# Pinned Python dependencies for the harness venv, with every sha256 PyPI (and this",
        "# machine's local indexes) serve for each pinned version, so --require-hashes works with",
        "# any of them. Regenerate with harness.deps.venv.relock().",
    ]
    for name in sorted(pins, key=_norm):
        version = pins[name]
        hashes = sorted(set(_pypi_hashes(name, version)) | set(_local_hashes(name, version)))
        entry = [f"{name}=={version}", *(f"    --hash=sha256:{h}" for h in hashes)]
        lines.append(" \\\n".join(entry))
    lock = ctx.pins / LOCK
    lock.write_text("\n".join(lines) + "\n")
    return lock
