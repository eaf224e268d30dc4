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
    sha256_file,
    warn,
    write_stamp,
)
from harness.deps.pins import Pin, load_pins

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
        if p.is_file() and ".git" not in p.parts and p.name != DRIFT_NOTE:
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(p.read_bytes())
    return h.hexdigest()


def _source(ctx: Context) -> tuple[Path, str, tuple[str, ...]]:
    """The pristine libvfio-user tree, a digest identifying it, and drift lines."""
    override = os.environ.get("LIBVFIO_USER_SRC")
    if override:
        src = Path(override).resolve()
        if not (src / "lib" / "dma.c").is_file():
            raise DepsError(f"LIBVFIO_USER_SRC={src} does not look like a libvfio-user tree")
        return src, "tree:" + tree_digest(src), ()
    lock = ctx.pins / "libvfio-user.lock"
    pins = {p.name: p for p in load_pins(lock)}
    orig, tree = pins["qemu"], pins["libvfio-user"]
    src = base(ctx) / f"src-{tree.sha256[:12]}"
    if (src / "lib" / "dma.c").is_file():
        return src, "tree:" + tree.sha256, _drift_of(src)
    if ctx.check:
        raise DepsError(f"{src} is missing")
    tarball, drift = fetch_orig(ctx, orig, ctx.downloads / "src")
    tmp = src.with_name(src.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"extracting {SUBTREE} from {tarball.name}")
    run(
        ["tar", "-xaf", tarball, "-C", tmp, "--strip-components=3", "--wildcards", f"*/{SUBTREE}/*"]
    )
    if not (tmp / "lib" / "dma.c").is_file():
        raise DepsError(f"{tarball.name} has no {SUBTREE}")
    check_tree(tmp, tree, tarball.name)
    if drift:
        (tmp / DRIFT_NOTE).write_text(drift + "\n")
    replace_dir(tmp, src)
    return src, "tree:" + tree.sha256, _drift_of(src)


DRIFT_NOTE = ".harness-drift"


def _drift_of(src: Path) -> tuple[str, ...]:
    try:
        line = (src / DRIFT_NOTE).read_text().strip()
    except FileNotFoundError:
        return ()
    warn(line)
    return (line,)


def check_tree(tree_dir: Path, pin: Pin, origin: str) -> None:
    """The extracted subtree must be the pinned libvfio-user, whatever tarball carried it."""
    digest = tree_digest(tree_dir)
    if digest != pin.sha256:
        raise DepsError(
            f"{origin} carries a different libvfio-user than the pinned {pin.version} (tree "
            f"sha256 {digest}, pinned {pin.sha256}); our patches and results are for "
            f"{pin.version}. Fix: set LIBVFIO_USER_SRC to a checkout of {pin.version}, or "
            "review the patches against the new tree and update qemu/pins/libvfio-user.lock")


def fetch_orig(ctx: Context, pin: Pin, dest: Path) -> tuple[Path, str]:
    """The qemu orig tarball: the pinned one if it is cached or still offered, else the one
    of the qemu source package the archive offers now (the tree check decides if it will do)."""
    assert pin.file
    target = dest / pin.file
    if target.exists() and sha256_file(target) == pin.sha256:
        return target, ""
    apt = AptRoot(ctx)
    try:
        apt.download_source(pin.spec(), dest)
    except DepsError as exc:
        log(f"pinned source {pin.spec()} is not offered ({str(exc).splitlines()[0]}); "
            "trying the qemu source the archive offers now")
        out = apt.download_source(pin.name, dest)
    else:
        if target.exists() and sha256_file(target) == pin.sha256:
            return target, ""
        out = ""
    found = sorted(dest.glob(f"{pin.name}_*.orig.tar.*"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise DepsError(f"apt-get source {pin.name} left no orig tarball in {dest}:\n{out}")
    got = found[-1]
    return got, (f"libvfio-user source: {pin.file} ({pin.sha256[:12]}) is gone or changed; "
                 f"took {got.name} ({sha256_file(got)[:12]}), whose {SUBTREE} is the pinned tree")


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
    src, digest, drift = _source(ctx)
    want = _want_stamp(ctx, digest)
    what = f"libvfio-user {digest[:17]} (static, {len(patches(ctx))} patches)"
    if _installed_ok(inst) and read_stamp(inst / STAMP) == want:
        return StepResult(what, str(inst), "cached", drift)
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
    return StepResult(what, str(inst), "installed", drift)
