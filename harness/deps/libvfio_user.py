"""libvfio-user: extract the pinned source, apply qemu/patches/libvfio-user, build a static PIC lib.

Result: CACHE/libvfio-user/install/{include/vfio-user/*.h, lib/libvfio-user.a}. Consumers also link
-ljson-c (libvfio-user's only external dependency), -ldl and -lpthread.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from harness.deps.aptroot import AptRoot
from harness.deps.common import (
    Context,
    DepsError,
    StepResult,
    log,
    read_stamp,
    replace_dir,
    run,
    write_stamp,
)
from harness.deps.pins import load_pins

SUBTREE = "subprojects/libvfio-user"
MESON_OPTIONS = (
    "-Ddefault_library=static",
    "-Db_staticpic=true",
    "-Dbuildtype=release",  # -O3 -g0 without -Werror; asserts stay (b_ndebug=false)
    "-Db_ndebug=false",
    "-Ddebug-logs=disabled",
)
STAMP = ".harness-stamp.json"


def base(ctx: Context) -> Path:
    return ctx.cache / "libvfio-user"


def prefix(ctx: Context) -> Path:
    return base(ctx) / "install"


def patches(ctx: Context) -> list[Path]:
    return sorted((ctx.patches / "libvfio-user").glob("*.patch"))


def tree_digest(root: Path) -> str:
    """Content hash of a source tree (paths + bytes), for LIBVFIO_USER_SRC stamps."""
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file() and ".git" not in p.parts:
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


def _source(ctx: Context) -> tuple[Path, str]:
    """The pristine libvfio-user tree and a digest identifying it."""
    override = os.environ.get("LIBVFIO_USER_SRC")
    if override:
        src = Path(override).resolve()
        if not (src / "lib" / "dma.c").is_file():
            raise DepsError(f"LIBVFIO_USER_SRC={src} does not look like a libvfio-user tree")
        return src, "tree:" + tree_digest(src)
    lock = ctx.pins / "libvfio-user.lock"
    (pin,) = load_pins(lock)
    src = base(ctx) / f"src-{pin.sha256[:12]}"
    if (src / "lib" / "dma.c").is_file():
        return src, "orig:" + pin.sha256
    if ctx.check:
        raise DepsError(f"{src} is missing")
    tarball = AptRoot(ctx).download_source_file(pin, ctx.downloads / "src", lock)
    tmp = src.with_name(src.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"extracting {SUBTREE} from {tarball.name}")
    run(
        ["tar", "-xJf", tarball, "-C", tmp, "--strip-components=3", "--wildcards", f"*/{SUBTREE}/*"]
    )
    if not (tmp / "lib" / "dma.c").is_file():
        raise DepsError(f"{tarball.name} has no {SUBTREE}")
    replace_dir(tmp, src)
    return src, "orig:" + pin.sha256


def _want_stamp(ctx: Context, digest: str) -> dict[str, object]:
    return {
        "source": digest,
        "patches": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in patches(ctx)},
        "meson_options": list(MESON_OPTIONS),
    }


def _installed_ok(inst: Path) -> bool:
    return (inst / "lib" / "libvfio-user.a").is_file() and (
        inst / "include" / "vfio-user" / "libvfio-user.h"
    ).is_file()


def ensure(ctx: Context) -> StepResult:
    inst = prefix(ctx)
    src, digest = _source(ctx)
    want = _want_stamp(ctx, digest)
    if _installed_ok(inst) and read_stamp(inst / STAMP) == want:
        return StepResult("libvfio-user (static, patched)", str(inst), "cached")
    if ctx.check:
        raise DepsError(f"{inst} is missing or built from other sources/patches")
    work = base(ctx) / "work"
    shutil.rmtree(work, ignore_errors=True)
    tree = work / "src"
    shutil.copytree(src, tree, symlinks=True)
    for p in patches(ctx):
        log(f"applying {p.name}")
        run(["patch", "-p1", "--forward", "--batch", "-i", p], cwd=tree)
    tmp_inst = base(ctx) / "install.tmp"
    shutil.rmtree(tmp_inst, ignore_errors=True)
    bdir = work / "build"
    run(["meson", "setup", bdir, tree, f"--prefix={tmp_inst}", "--libdir=lib", *MESON_OPTIONS])
    run(["ninja", "-C", bdir, "lib/libvfio-user.a"])  # just the library: no samples or tests
    run(["meson", "install", "-C", bdir, "--no-rebuild", "--tags", "devel"])
    if not _installed_ok(tmp_inst):
        raise DepsError(f"meson install did not produce libvfio-user.a + headers in {tmp_inst}")
    write_stamp(tmp_inst / STAMP, want)
    replace_dir(tmp_inst, inst)
    shutil.rmtree(work, ignore_errors=True)
    n = len(patches(ctx))
    return StepResult(f"libvfio-user (static, {n} patches)", str(inst), "installed")
