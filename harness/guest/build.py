"""Build the guest: compile guest/src/*.c statically (content-hash cached), assemble the initramfs.

The orchestrator calls :func:`build_initramfs`; ``python -m harness.guest`` does the same by hand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
from collections.abc import Mapping
from pathlib import Path

from harness.guest.initramfs import build_archive, write_image
from harness.paths import build_dir, load_env, repo_root

log = logging.getLogger(__name__)

GUEST_DIR = repo_root() / "guest"
SRC_DIR = GUEST_DIR / "src"
BUILD_DIR = build_dir() / "guest"
CFLAGS = ("-Wall", "-Wextra", "-O2", "-static")
IMAGE_NAME = "initramfs.cpio.gz"


class GuestBuildError(RuntimeError):
    """A guest program failed to compile; carries the compiler's argv and output."""

    def __init__(self, argv: list[str], output: str) -> None:
        super().__init__(f"{' '.join(argv)} failed:\n{output}")
        self.argv = argv
        self.output = output


def _compiler_id(cc: str) -> bytes:
    """The compiler's version banner, part of the cache key so a new gcc rebuilds."""
    return subprocess.run([cc, "--version"], capture_output=True, check=True).stdout


def compile_programs(
    src_dir: Path = SRC_DIR, out_dir: Path = BUILD_DIR, *, cc: str = "gcc"
) -> dict[str, Path]:
    """Compile each ``*.c`` into a static binary named after it; returns {name: path}.

    The cache key covers the source, every header in ``src_dir``, the flags and the compiler,
    so unchanged sources are never rebuilt and changed ones always are.
    """
    if shutil.which(cc) is None:
        raise GuestBuildError([cc], f"compiler {cc!r} not found")
    common = hashlib.sha256(_compiler_id(cc) + "\0".join(CFLAGS).encode())
    for header in sorted(src_dir.glob("*.h")):
        common.update(header.name.encode() + b"\0" + header.read_bytes())
    programs: dict[str, Path] = {}
    for source in sorted(src_dir.glob("*.c")):
        key = common.copy()
        key.update(source.read_bytes())
        out = out_dir / "bin" / f"{source.stem}-{key.hexdigest()[:16]}"
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
            argv = [cc, *CFLAGS, "-o", str(tmp), str(source)]
            proc = subprocess.run(argv, capture_output=True, text=True)
            if proc.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise GuestBuildError(argv, proc.stderr)
            if proc.stderr.strip():
                log.warning("%s: compiler output:\n%s", source.name, proc.stderr)
            tmp.replace(out)
            log.info("compiled %s -> %s", source.name, out)
        programs[source.stem] = out
    return programs


def _env_inputs() -> tuple[Path, dict[str, Path]]:
    """busybox and module paths from the environment manifest written by ``make deps``."""
    env = load_env()
    return env.busybox, dict(env.modules)


def guest_files() -> dict[str, Path]:
    """Scripts of ours that go into every image besides /init (archive path -> source)."""
    agent = GUEST_DIR / "agent"
    return {"sbin/harness-agent": agent} if agent.exists() else {}


def build_initramfs(
    *,
    out: Path | None = None,
    busybox: Path | None = None,
    modules: Mapping[str, Path] | None = None,
    compress: bool = True,
    files: Mapping[str, Path] | None = None,
    require: tuple[str, ...] | None = None,
) -> Path:
    """Compile the programs and write the initramfs (default build/guest/initramfs.cpio.gz).

    ``busybox``/``modules`` default to the environment manifest (harness.paths.load_env()).
    """
    if busybox is None or modules is None:
        env_busybox, env_modules = _env_inputs()
        busybox = busybox or env_busybox
        modules = modules if modules is not None else env_modules
    programs = compile_programs()
    extra = dict(guest_files())
    extra.update(files or {})
    archive = build_archive(
        busybox=busybox, init=GUEST_DIR / "init", modules=modules, programs=programs,
        files=extra, **({"require": require} if require is not None else {}),
    )
    target = out or BUILD_DIR / (IMAGE_NAME if compress else "initramfs.cpio")
    write_image(archive, target, compress=compress)
    log.info("wrote %s", target)
    return target
