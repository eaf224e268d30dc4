"""The guest's vfio modules (vfio, vfio_iommu_type1, vfio-pci and their dependencies), for the
raw driver's vfio backend behind a vIOMMU.

The pinned Debian kernel builds them as modules (CONFIG_VFIO=m, CONFIG_VFIO_PCI=m,
CONFIG_VFIO_IOMMU_TYPE1=m, CONFIG_IRQ_BYPASS_MANAGER=m; no IOMMUFD), and the default initramfs
carries only the virtio_net chain. :func:`ensure` takes them from the pinned linux-modules .deb
that ``make deps`` already downloaded, checks each one's vermagic and dependencies, and lays them
out as a tree for ``TestbedConfig.initrd_add``: ``lib/modules/vfio/<name>.ko`` plus a
``load-order`` file. They are not in /init's load order, so booting changes nothing: whoever
needs vfio insmods them (see :func:`insmod_command`).
"""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

from harness import paths
from harness.deps.guest import deb_members, modinfo

#: Dependencies first (modinfo: vfio-pci-core depends on vfio and irqbypass; vfio-pci on both).
ORDER = ("irqbypass", "vfio", "vfio_iommu_type1", "vfio-pci-core", "vfio-pci")
GUEST_DIR = "lib/modules/vfio"


class VfioModulesError(RuntimeError):
    """The modules cannot be provided (no pinned .deb, a bad module)."""


def _deb(kver: str) -> Path:
    found = sorted((paths.cache_dir() / "downloads" / "guest").glob(f"linux-modules-{kver}_*.deb"))
    if not found:
        raise VfioModulesError(f"no linux-modules-{kver} package in the cache: run `make deps`")
    return found[-1]


def _check(mods: dict[str, bytes], kver: str) -> None:
    for name, data in mods.items():
        info = modinfo(data)
        vermagic = (info.get("vermagic") or [""])[0].split(" ", 1)[0]
        if vermagic != kver:
            raise VfioModulesError(f"{name}.ko vermagic {vermagic!r} is not kernel {kver}")
        for dep in filter(None, ",".join(info.get("depends", [])).split(",")):
            if dep not in mods:
                raise VfioModulesError(f"{name}.ko depends on {dep}, not in {ORDER}")


def ensure(kver: str | None = None) -> Path:
    """A directory for ``initrd_add`` holding the vfio modules (cached per kernel version)."""
    kver = kver or paths.load_env().kernel_version
    root = paths.cache_dir() / "guest-vfio" / kver
    if (root / GUEST_DIR / "load-order").is_file():
        return root
    wanted = {f"/{m}.ko.xz": m for m in ORDER}
    try:
        mods = {m: lzma.decompress(x) for m, x in deb_members(_deb(kver), wanted).items()}
    except Exception as exc:  # DepsError, LZMAError: one message for the caller
        raise VfioModulesError(f"vfio modules of {kver}: {exc}") from None
    _check(mods, kver)
    tmp = root.with_name(f".{root.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / GUEST_DIR).mkdir(parents=True)
    for m, data in mods.items():
        (tmp / GUEST_DIR / f"{m}.ko").write_bytes(data)
    (tmp / GUEST_DIR / "load-order").write_text("".join(f"{m}\n" for m in ORDER))
    shutil.rmtree(root, ignore_errors=True)
    tmp.replace(root)
    return root


def insmod_command() -> str:
    """The guest shell command that loads them in order (an already loaded one is fine)."""
    return (f"for m in $(cat /{GUEST_DIR}/load-order); do "
            f"[ -d /sys/module/$(echo $m | tr - _) ] || insmod /{GUEST_DIR}/$m.ko || exit 1; "
            "done")
