"""harness.guest.vfio_modules: the checks on the vfio modules taken from the kernel package."""

from __future__ import annotations

import pytest

from harness.guest.vfio_modules import ORDER, VfioModulesError, _check, insmod_command

KVER = "7.3.4+deb13-amd64"


def _ko(depends: str, kver: str = KVER) -> bytes:
    return b"\0".join([b"name=x", f"depends={depends}".encode(),
                       f"vermagic={kver} SMP preempt mod_unload".encode(), b""])


def _set() -> dict[str, bytes]:
    deps = {"irqbypass": "", "vfio": "", "vfio_iommu_type1": "vfio",
            "vfio-pci-core": "vfio,irqbypass", "vfio-pci": "vfio-pci-core,vfio"}
    return {m: _ko(deps[m]) for m in ORDER}


def test_a_consistent_set_passes() -> None:
    _check(_set(), KVER)


def test_a_missing_dependency_is_refused() -> None:
    mods = _set()
    del mods["irqbypass"]
    with pytest.raises(VfioModulesError, match="depends on irqbypass"):
        _check(mods, KVER)


def test_a_module_of_another_kernel_is_refused() -> None:
    mods = _set()
    mods["vfio"] = _ko("", "6.1.0-1-amd64")
    with pytest.raises(VfioModulesError, match="vermagic"):
        _check(mods, KVER)


def test_the_insmod_command_follows_the_load_order_file() -> None:
    cmd = insmod_command()
    assert "/lib/modules/vfio/load-order" in cmd and "exit 1" in cmd
