"""Shared runtime for the installer steps: the context, errors, subprocess and stamp helpers."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


class DepsError(RuntimeError):
    """A step cannot finish; the message says what is wrong and how to fix it."""


@dataclass(frozen=True)
class Context:
    repo: Path
    cache: Path
    venv: Path
    check: bool  # verify only: never download, build or install
    verbose: bool = False
    #: A sources.list to use instead of qemu/apt/sources.list.in (a mirror; the tests' local
    #: file repository). From $HARNESS_APT_SOURCES on the command line.
    apt_sources: Path | None = None

    @property
    def pins(self) -> Path:
        return self.repo / "qemu" / "pins"

    @property
    def patches(self) -> Path:
        return self.repo / "qemu" / "patches"

    @property
    def apt_templates(self) -> Path:
        return self.repo / "qemu" / "apt"

    @property
    def downloads(self) -> Path:
        return self.cache / "downloads"


@dataclass(frozen=True)
class StepResult:
    what: str  # short summary, e.g. "QEMU 11.1.3 (private root)"
    where: str
    status: str  # "cached", "installed", "ok", "system"
    #: Differences from the pins (harness.deps.resolve.drift_line), for env.json and summaries.
    drift: tuple[str, ...] = ()


def log(msg: str) -> None:
    print(f"deps: {msg}", file=sys.stderr, flush=True)


def warn(msg: str) -> None:
    """One line that says what changed from a pin; it also goes into env.json's `drift`."""
    print(f"deps: WARNING: {msg}", file=sys.stderr, flush=True)


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    capture: bool = True,
    check: bool = True,
    stdin: int | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise DepsError with its output tail."""
    args = [os.fspath(a) for a in argv]
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        cp = subprocess.run(
            args,
            cwd=cwd,
            env=full_env,
            text=True,
            stdin=stdin,
            stdout=subprocess.PIPE if capture else None,
            stderr=subprocess.STDOUT if capture else None,
        )
    except FileNotFoundError:
        raise DepsError(f"command not found: {args[0]}") from None
    if check and cp.returncode != 0:
        tail = "\n".join((cp.stdout or "").splitlines()[-25:])
        raise DepsError(f"`{' '.join(args)}` failed (exit {cp.returncode}):\n{tail}")
    return cp


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def sha256_text(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()


def read_stamp(path: Path) -> dict[str, object] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_stamp(path: Path, data: Mapping[str, object]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(data), indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a freshly built directory into place, removing the old one."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp.rename(final)


def is_root() -> bool:
    return os.geteuid() == 0


def is_debian_like() -> bool:
    if not Path("/etc/debian_version").exists():
        return False
    return shutil.which("apt-get") is not None and shutil.which("dpkg") is not None
