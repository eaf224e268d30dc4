"""QEMU >= 10.1 with vfio-user-pci: the system's if good enough, else a private root of pinned debs.

The private root is trixie-backports' qemu-system-x86 and its closure, `dpkg-deb -x`-ed into
CACHE/qemu-root and run through that root's own dynamic loader (LD_LIBRARY_PATH alone fails).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from harness.deps import resolve
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
    write_stamp,
)
from harness.deps.pins import Pin, find_deb, format_pins, load_pins, version_at_least

MIN_VERSION = (10, 1)
LOCK = "qemu-debs.lock"
ROOT_PACKAGE = "qemu-system-x86"
ROOT_RELEASE = "trixie-backports"
STAMP = ".harness-stamp.json"
#: What the cache really holds, when the archive has moved on from the lock (resolve.Resolved).
RESOLVED = "qemu-resolved.json"
CONSTRAINT = "QEMU >= 10.1 with vfio-user-pci"
MULTIARCH = "usr/lib/x86_64-linux-gnu"


@dataclass(frozen=True)
class Qemu:
    argv: list[str]
    version: str


def probe(argv: list[str]) -> Qemu | None:
    """The QEMU behind argv if it runs, is >= 10.1 and lists vfio-user-pci; else None."""
    try:
        ver = run([*argv, "--version"], check=False)
    except DepsError:
        return None
    m = re.search(r"QEMU emulator version (\d+\.\d+(?:\.\d+)?)", ver.stdout or "")
    if ver.returncode != 0 or not m or not version_at_least(m.group(1), MIN_VERSION):
        return None
    dev = run([*argv, "-device", "help"], check=False)
    if dev.returncode != 0 or '"vfio-user-pci"' not in (dev.stdout or ""):
        return None
    return Qemu(argv, m.group(1))


def root_dir(ctx: Context) -> Path:
    return ctx.cache / "qemu-root"


def private_argv(root: Path) -> list[str]:
    lib = root / MULTIARCH
    return [
        str(lib / "ld-linux-x86-64.so.2"),
        "--library-path",
        str(lib),
        str(root / "usr/bin/qemu-system-x86_64"),
        "-L",
        str(root / "usr/share/qemu"),
        "-L",
        str(root / "usr/share/seabios"),
    ]


def _acceptable(version: str) -> bool:
    """A Debian version of qemu-system-x86 that may satisfy the constraint (the probe of the
    extracted binary decides; this only skips what cannot)."""
    try:
        return version_at_least(resolve.upstream(version), MIN_VERSION)
    except ValueError:
        return False


def ensure(ctx: Context) -> tuple[StepResult, Qemu]:
    system = shutil.which("qemu-system-x86_64")
    if system:
        q = probe([system])
        if q:
            return StepResult(f"QEMU {q.version} (system)", system, "system"), q
    return ensure_private(ctx)


def ensure_private(ctx: Context) -> tuple[StepResult, Qemu]:
    """trixie-backports' QEMU in CACHE/qemu-root, resolved by the drift policy."""
    lock = ctx.pins / LOCK
    lock_pins = load_pins(lock)
    lock_digest = sha256_file(lock)
    root = root_dir(ctx)
    debs = ctx.downloads / "qemu-debs"
    manifest = ctx.cache / RESOLVED
    resolved = resolve.Resolved.load(manifest, lock_digest)
    if resolved is not None and read_stamp(root / STAMP) == {"resolved": resolved.digest()}:
        resolve.check_files(debs, resolved.pins)
        q = probe(private_argv(root))
        if q is None:
            raise DepsError(
                f"{root} exists but its QEMU does not run or lacks vfio-user-pci; "
                f"delete {root} and rerun"
            )
        return _result(q, resolved, root, "cached"), q
    if ctx.check:
        raise DepsError(f"{root} is missing or stale (and there is no system QEMU >= 10.1 "
                        "with vfio-user-pci)")
    resolved = resolve.closure(AptRoot(ctx), lock_pins, ROOT_PACKAGE, ROOT_RELEASE, debs,
                               _acceptable, CONSTRAINT)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    log(f"extracting {len(resolved.pins)} debs into {root}")
    for p in resolved.pins:
        deb = find_deb(debs, p)
        assert deb is not None
        run(["dpkg-deb", "-x", deb, tmp])
    q = probe(private_argv(tmp))
    if q is None:
        version = resolved.by_name()[ROOT_PACKAGE].version
        raise DepsError(
            f"{ROOT_PACKAGE} {version} from {ROOT_RELEASE} does not satisfy {CONSTRAINT} "
            f"(it does not run, or lacks vfio-user-pci; see `{' '.join(private_argv(tmp))} "
            "-device help`). Fix: install a QEMU >= 10.1 built with vfio-user into the "
            "system, or point HARNESS_APT_SOURCES at an archive that has one")
    write_stamp(tmp / STAMP, {"resolved": resolved.digest()})
    replace_dir(tmp, root)
    manifest.write_text(resolved.to_json(lock_digest))
    q = probe(private_argv(root))
    assert q is not None
    return _result(q, resolved, root, "installed"), q


def _result(q: Qemu, resolved: resolve.Resolved, root: Path, status: str) -> StepResult:
    drift = resolve.report("QEMU closure", resolved)
    pkg = resolved.by_name()[ROOT_PACKAGE]
    return StepResult(f"QEMU {q.version} ({pkg.name} {pkg.version}, private root, "
                      f"{len(resolved.pins)} debs)", str(root), status, drift)


def relock(ctx: Context) -> Path:
    """Resolve qemu-system-x86 from trixie-backports afresh and rewrite qemu/pins/qemu-debs.lock."""
    apt = AptRoot(ctx)
    apt.configure()
    apt.update(force=True)
    archives = apt.root / "relock"
    shutil.rmtree(archives, ignore_errors=True)
    (archives / "partial").mkdir(parents=True)
    run(
        [
            "apt-get",
            "install",
            "-y",
            "--download-only",
            "-t",
            ROOT_RELEASE,
            f"-oDir::Cache::archives={archives}",
            ROOT_PACKAGE,
        ],
        env=apt.env,
    )
    pins = []
    for deb in sorted(archives.glob("*.deb")):
        fields = run(["dpkg-deb", "-f", deb, "Package", "Version"]).stdout.splitlines()
        kv = dict(line.split(": ", 1) for line in fields if ": " in line)
        pins.append(Pin(kv["Package"], kv["Version"], sha256_file(deb)))
    lock = ctx.pins / LOCK
    lock.write_text(
        format_pins(
            pins,
            header=(
                f"{ROOT_PACKAGE} from {ROOT_RELEASE} and its dependency closure (Recommends off),\n"
                "resolved against an empty dpkg status.\n"
                "Regenerate: python3 -m harness.deps --relock qemu\n"
                "name version sha256"
            ),
        )
    )
    dest = ctx.downloads / "qemu-debs"
    dest.mkdir(parents=True, exist_ok=True)
    for deb in archives.glob("*.deb"):
        shutil.move(str(deb), dest / deb.name)
    shutil.rmtree(archives, ignore_errors=True)
    return lock
