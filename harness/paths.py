"""Where things live: the repository, the dependency cache, the build dir and env.json.

Stdlib only: `python3 -m harness.deps` imports this before any venv exists.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_FILE = "env.json"


class EnvError(RuntimeError):
    """env.json is missing or does not describe usable dependencies."""


def repo_root() -> Path:
    """The repository checkout this package was imported from."""
    return Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """${HARNESS_CACHE:-${XDG_CACHE_HOME:-~/.cache}/harness} (not created here)."""
    explicit = os.environ.get("HARNESS_CACHE")
    if explicit:
        return Path(explicit).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return (base / "harness").resolve()


def build_dir() -> Path:
    """<repo>/build: per-checkout build outputs (gitignored)."""
    return repo_root() / "build"


def new_run_dir(root: Path) -> Path:
    """root/<YYYYmmdd-HHMMSS>[-N], created, with root/latest pointing at it. Safe when several
    runs start in the same second (pytest -n): each gets its own directory."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root.mkdir(parents=True, exist_ok=True)
    suffix = 0
    while True:
        run = root / (stamp if suffix == 0 else f"{stamp}-{suffix}")
        try:
            run.mkdir()
            break
        except FileExistsError:
            suffix += 1
    # Replace `latest` atomically: a concurrent run may be doing the same.
    tmp = root / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run.name)
    os.replace(tmp, root / "latest")
    return run


def env_path() -> Path:
    return cache_dir() / ENV_FILE


@dataclass(frozen=True)
class Env:
    """The dependency manifest written by `make deps` (see docs/DESIGN.md)."""

    qemu: tuple[str, ...]  # argv prefix: loader, --library-path, ..., qemu binary, -L dirs
    qemu_version: str
    libvfio_user_prefix: Path  # include/ + lib/libvfio-user.a
    kernel: Path
    kernel_version: str
    modules: dict[str, Path]  # name -> decompressed .ko, in load order
    busybox: Path
    #: What each dependency step installed, exactly (package versions, tree digests).
    provenance: dict[str, str] = field(default_factory=dict)
    #: Where that differs from the pins because the archive moved on (one line per step).
    drift: tuple[str, ...] = ()

    @property
    def qemu_argv(self) -> list[str]:
        return list(self.qemu)

    def to_json(self) -> dict[str, Any]:
        return {
            "qemu": list(self.qemu),
            "qemu_version": self.qemu_version,
            "libvfio_user_prefix": str(self.libvfio_user_prefix),
            "kernel": str(self.kernel),
            "kernel_version": self.kernel_version,
            "modules": {k: str(v) for k, v in self.modules.items()},
            "busybox": str(self.busybox),
            "provenance": dict(self.provenance),
            "drift": list(self.drift),
        }

    @classmethod
    def from_json(cls, data: object) -> Env:
        if not isinstance(data, dict):
            raise EnvError("env.json: top level is not an object")
        try:
            qemu = data["qemu"]
            modules = data["modules"]
            if not isinstance(qemu, list) or not all(isinstance(a, str) for a in qemu) or not qemu:
                raise EnvError("env.json: 'qemu' must be a non-empty list of strings")
            if not isinstance(modules, dict):
                raise EnvError("env.json: 'modules' must be an object")
            return cls(
                qemu=tuple(qemu),
                qemu_version=_str(data, "qemu_version"),
                libvfio_user_prefix=Path(_str(data, "libvfio_user_prefix")),
                kernel=Path(_str(data, "kernel")),
                kernel_version=_str(data, "kernel_version"),
                modules={str(k): Path(_str(modules, k)) for k in modules},
                busybox=Path(_str(data, "busybox")),
                provenance={str(k): str(v) for k, v in dict(data.get("provenance", {})).items()},
                drift=tuple(str(x) for x in data.get("drift", [])),
            )
        except KeyError as e:
            raise EnvError(f"env.json: missing key {e}") from None


def _str(d: dict[Any, Any], key: str) -> str:
    v = d[key]
    if not isinstance(v, str):
        raise EnvError(f"env.json: {key!r} must be a string")
    return v


def load_env(path: Path | None = None) -> Env:
    """Read env.json; raise EnvError naming the fix when it is missing or stale."""
    p = path if path is not None else env_path()
    hint = "run `make deps` (python3 -m harness.deps)"
    try:
        raw = p.read_text()
    except FileNotFoundError:
        raise EnvError(f"{p} not found: {hint}") from None
    try:
        env = Env.from_json(json.loads(raw))
    except json.JSONDecodeError as e:
        raise EnvError(f"{p} is not valid JSON ({e}): {hint}") from None
    missing = [
        str(f)
        for f in (env.kernel, env.busybox, env.libvfio_user_prefix, *env.modules.values())
        if not f.exists()
    ]
    if missing:
        raise EnvError(f"{p} names missing files ({', '.join(missing)}): {hint}")
    return env
