"""Guest artifacts: pinned kernel (vmlinuz), the virtio_net module chain (decompressed) and busybox.

Everything lands in CACHE/guest/. Module dependencies are checked against the kernel's
modules.builtin (from linux-base) so the guest can insmod failover, net_failover, virtio_net.
"""

from __future__ import annotations

import lzma
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
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
    write_stamp,
)
from harness.deps.pins import Pin, find_deb, load_pins

MODULES = ("failover", "net_failover", "virtio_net")  # load order
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


def _members(deb: Path, wanted: dict[str, str]) -> dict[str, bytes]:
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


def ensure(ctx: Context) -> tuple[StepResult, Guest]:
    lock = ctx.pins / "guest-debs.lock"
    bb_lock = ctx.pins / "busybox.lock"
    pins = load_pins(lock)
    (bb_pin,) = load_pins(bb_lock)
    kver = kernel_version_of(pins)
    debs = ctx.downloads / "guest"
    apt = AptRoot(ctx)
    apt.download_debs(pins, debs, lock)
    apt.download_debs([bb_pin], debs, bb_lock, system=True)
    d = guest_dir(ctx)
    want_inputs = {"kernel_debs": sha256_file(lock), "busybox": sha256_file(bb_lock)}
    g = _outputs(d, kver)
    stamp = read_stamp(d / STAMP)
    if stamp and stamp.get("inputs") == want_inputs:
        try:
            if stamp.get("outputs") == _output_hashes(g):
                return StepResult(f"guest kernel {kver} + modules + busybox", str(d), "cached"), g
        except OSError:
            pass
    if ctx.check:
        raise DepsError(f"{d} is missing or stale")

    def deb(prefix: str) -> Path:
        for p in pins:
            if p.name.startswith(prefix):
                found = find_deb(debs, p)
                assert found is not None
                return found
        raise DepsError(f"{lock} pins no {prefix}* package")

    log(f"extracting kernel {kver}, {', '.join(MODULES)} and busybox")
    kdir = f"/lib/modules/{kver}/"
    base = _members(
        deb("linux-base-"), {kdir + "modules.builtin": "builtin", kdir + "config": "config"}
    )
    binary = _members(deb("linux-binary-"), {kdir + "vmlinuz": "vmlinuz"})
    mods_xz = _members(deb("linux-modules-"), {f"/{m}.ko.xz": m for m in MODULES})
    bb_deb = find_deb(debs, bb_pin)
    assert bb_deb is not None
    bb = _members(bb_deb, {"./bin/busybox": "busybox"})
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
    write_stamp(tmp / STAMP, {"inputs": want_inputs, "outputs": _output_hashes(tg)})
    replace_dir(tmp, d)
    return StepResult(f"guest kernel {kver} + modules + busybox", str(d), "installed"), g
