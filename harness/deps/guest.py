"""Guest artifacts: pinned kernel (vmlinuz), the virtio_net module chain (decompressed) and busybox.

Everything lands in CACHE/guest/. Module dependencies are checked against the kernel's
modules.builtin (from linux-base) so the guest can insmod failover, net_failover, virtio_net.
"""

from __future__ import annotations

import lzma
import re
import shutil
import subprocess
import tarfile
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
    sha256_text,
    write_stamp,
)
from harness.deps.pins import Pin, find_deb, load_pins
from harness.deps.resolve import Drift

MODULES = ("failover", "net_failover", "virtio_net")  # load order
KERNEL_META = "linux-image-amd64"
KERNEL_PARTS = ("linux-base", "linux-binary", "linux-modules")
#: What the cache really holds (resolve.Resolved), when the archive moved on from the locks.
RESOLVED = "guest-resolved.json"
BUILTIN_NEEDED = ("virtio", "virtio_ring", "virtio_pci")
STAMP = ".harness-stamp.json"


@dataclass(frozen=True)
class Guest:
    kernel: Path
    kernel_version: str
    modules: dict[str, Path]
    busybox: Path


def guest_dir(ctx: Context) -> Path:
    return ctx.cache / "guest"


def kernel_version_of(pins: list[Pin]) -> str:
    for p in pins:
        if p.name.startswith("linux-binary-"):
            return p.name.removeprefix("linux-binary-")
    raise DepsError("guest-debs.lock pins no linux-binary-<version> package")


def modinfo(ko: bytes) -> dict[str, list[str]]:
    """key=value strings of a module's .modinfo section (scans NUL-separated strings)."""
    info: dict[str, list[str]] = {}
    for raw in ko.split(b"\0"):
        for key in (b"depends=", b"vermagic=", b"name="):
            if raw.startswith(key):
                info.setdefault(key[:-1].decode(), []).append(
                    raw[len(key) :].decode(errors="replace")
                )
    return info


def check_modules(mods: dict[str, bytes], builtin: set[str], kver: str) -> None:
    """Every dependency resolves to a shipped or built-in module; vermagic matches the kernel."""
    for name, data in mods.items():
        info = modinfo(data)
        vermagic = (info.get("vermagic") or [""])[0]
        if vermagic.split(" ", 1)[0] != kver:
            raise DepsError(f"{name}.ko vermagic {vermagic!r} does not match kernel {kver}")
        for dep in filter(None, ",".join(info.get("depends", [])).split(",")):
            if dep not in mods and dep not in builtin:
                raise DepsError(
                    f"{name}.ko depends on {dep}, which is neither built in nor shipped"
                )
    missing = [m for m in BUILTIN_NEEDED if m not in builtin]
    if missing:
        raise DepsError(f"kernel {kver} does not build in {', '.join(missing)}")


def deb_members(deb: Path, wanted: dict[str, str]) -> dict[str, bytes]:
    """Read selected members (path suffix -> key) from a .deb's data tarball, nothing else."""
    proc = subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    out: dict[str, bytes] = {}
    with tarfile.open(fileobj=proc.stdout, mode="r|") as tar:
        for m in tar:
            for suffix, key in wanted.items():
                if m.isfile() and m.name.endswith(suffix):
                    f = tar.extractfile(m)
                    assert f is not None
                    out[key] = f.read()
    proc.wait()
    if proc.returncode != 0:
        raise DepsError(f"dpkg-deb --fsys-tarfile {deb} failed")
    missing = set(wanted.values()) - set(out)
    if missing:
        raise DepsError(f"{deb.name} lacks {', '.join(sorted(missing))}")
    return out


def _outputs(d: Path, kver: str) -> Guest:
    return Guest(
        kernel=d / f"vmlinuz-{kver}",
        kernel_version=kver,
        modules={m: d / "modules" / f"{m}.ko" for m in MODULES},
        busybox=d / "busybox",
    )


def _output_hashes(g: Guest) -> dict[str, str]:
    files = [g.kernel, g.busybox, *g.modules.values()]
    return {f.name: sha256_file(f) for f in files}


def _kernel_from_meta(apt: AptRoot, lock: list[Pin]) -> list[Pin]:
    """The kernel that trixie-backports' linux-image-amd64 points at today, as pins of its
    linux-base/-binary/-modules packages (sha256 left blank: the archive's index vouches)."""
    offered = apt.offered(KERNEL_META)
    if not offered:
        raise DepsError(f"the pinned kernel ({', '.join(p.spec() for p in lock)}) is no longer "
                        f"offered and neither is {KERNEL_META}: point HARNESS_APT_SOURCES at "
                        "an archive that has it, or update qemu/pins/guest-debs.lock")
    meta = offered[-1]
    m = re.search(r"linux-image-(\S+-amd64) \(= ([^)]+)\)", apt.field(KERNEL_META, meta, "Depends"))
    if not m:
        raise DepsError(f"{KERNEL_META}={meta} does not depend on a linux-image-<version>-amd64")
    kver, version = m.group(1), m.group(2)
    pins = [Pin(f"{part}-{kver}", version, "0" * 64) for part in KERNEL_PARTS]
    for p in pins:
        if version not in apt.offered(p.name):
            raise DepsError(f"the pinned kernel is gone and its newest candidate {kver} does not "
                            f"come as {', '.join(KERNEL_PARTS)} (no {p.spec()}): update "
                            "qemu/pins/guest-debs.lock by hand")
    return pins


def resolve_kernel(apt: AptRoot, lock: list[Pin], dest: Path) -> tuple[list[Pin], list[Drift]]:
    """The pinned kernel packages if offered (newer Debian revisions of the same packages
    taken with drift); if they are gone, the kernel linux-image-amd64 points at now."""
    got = [resolve.single(apt, p, dest) for p in lock]
    if all(g is not None for g in got):
        pairs = [g for g in got if g is not None]
        return [p for p, _ in pairs], [d for _, d in pairs if d is not None]
    candidates = _kernel_from_meta(apt, lock)
    apt.download([p.spec() for p in candidates], dest)
    pins = [resolve.hashed(dest, p.name, p.version, {}) for p in candidates]
    drift = [Drift(new.name, f"{old.name} {old.version}", new.version, matters=True)
             for old, new in zip(lock, pins, strict=True)]
    return pins, drift


def _resolve(ctx: Context, lock: Path, bb_lock: Path, dest: Path) -> resolve.Resolved:
    apt = AptRoot(ctx)
    kpins, drift = resolve_kernel(apt, load_pins(lock), dest)
    (bb_pin,) = load_pins(bb_lock)
    got = resolve.single(apt, bb_pin, dest, system=True)
    if got is None:
        raise DepsError(f"{bb_pin.name} is not offered by the system's APT sources: run "
                        "`apt-get update`, or update qemu/pins/busybox.lock")
    bb, bb_drift = got
    return resolve.Resolved([*kpins, bb], drift + ([bb_drift] if bb_drift else []))


def ensure(ctx: Context) -> tuple[StepResult, Guest]:
    lock = ctx.pins / "guest-debs.lock"
    bb_lock = ctx.pins / "busybox.lock"
    lock_digest = sha256_text(sha256_file(lock), sha256_file(bb_lock))
    debs = ctx.downloads / "guest"
    manifest = ctx.cache / RESOLVED
    d = guest_dir(ctx)
    resolved = resolve.Resolved.load(manifest, lock_digest)
    if resolved is not None:
        resolve.check_files(debs, resolved.pins)
        g = _outputs(d, kernel_version_of(resolved.pins))
        stamp = read_stamp(d / STAMP)
        try:
            if stamp == {"inputs": resolved.digest(), "outputs": _output_hashes(g)}:
                return _result(g, resolved, d, "cached"), g
        except OSError:
            pass
    if ctx.check:
        raise DepsError(f"{d} is missing or stale")
    resolved = _resolve(ctx, lock, bb_lock, debs)
    pins = resolved.pins
    kver = kernel_version_of(pins)
    bb_pin = pins[-1]

    def deb(prefix: str) -> Path:
        for p in pins:
            if p.name.startswith(prefix):
                found = find_deb(debs, p)
                assert found is not None
                return found
        raise DepsError(f"{lock} pins no {prefix}* package")

    log(f"extracting kernel {kver}, {', '.join(MODULES)} and busybox")
    kdir = f"/lib/modules/{kver}/"
    base = deb_members(
        deb("linux-base-"), {kdir + "modules.builtin": "builtin", kdir + "config": "config"}
    )
    binary = deb_members(deb("linux-binary-"), {kdir + "vmlinuz": "vmlinuz"})
    mods_xz = deb_members(deb("linux-modules-"), {f"/{m}.ko.xz": m for m in MODULES})
    bb_deb = find_deb(debs, bb_pin)
    assert bb_deb is not None
    bb = deb_members(bb_deb, {"./bin/busybox": "busybox"})
    mods = {m: lzma.decompress(x) for m, x in mods_xz.items()}
    builtin = {
        Path(line.strip()).name.removesuffix(".ko")
        for line in base["builtin"].decode().splitlines()
        if line.strip()
    }
    check_modules(mods, builtin, kver)
    if binary["vmlinuz"][0x202:0x206] != b"HdrS":
        raise DepsError("vmlinuz is not an x86 bzImage (no HdrS magic)")

    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "modules").mkdir(parents=True)
    tg = _outputs(tmp, kver)
    tg.kernel.write_bytes(binary["vmlinuz"])
    (tmp / f"config-{kver}").write_bytes(base["config"])
    (tmp / "modules.builtin").write_bytes(base["builtin"])
    for m, data in mods.items():
        tg.modules[m].write_bytes(data)
    tg.busybox.write_bytes(bb["busybox"])
    tg.busybox.chmod(0o755)
    out = run([tg.busybox, "echo", "busybox-ok"], check=False)
    if "busybox-ok" not in (out.stdout or ""):
        raise DepsError(f"{tg.busybox} does not run: {out.stdout}")
    write_stamp(tmp / STAMP, {"inputs": resolved.digest(), "outputs": _output_hashes(tg)})
    replace_dir(tmp, d)
    manifest.write_text(resolved.to_json(lock_digest))
    g = _outputs(d, kver)
    return _result(g, resolved, d, "installed"), g


def _result(g: Guest, resolved: resolve.Resolved, d: Path, status: str) -> StepResult:
    drift = resolve.report("guest", resolved)
    names = {p.name: p.version for p in resolved.pins}
    kpkg = f"linux-binary-{g.kernel_version}"
    return StepResult(f"guest kernel {g.kernel_version} ({names.get(kpkg, '?')}) + modules + "
                      f"busybox {names.get('busybox-static', '?')}", str(d), status, drift)
