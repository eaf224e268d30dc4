"""The raw userspace virtio-net driver behind a vIOMMU: vnetraw's vfio backend (--vfio).

The guest boots with intel_iommu=on behind QEMU's intel-iommu; vnetraw binds the device to
vfio-pci, opens a type1v2 container on its IOMMU group and maps each DMA page with
VFIO_IOMMU_MAP_DMA at IOVAs it picks (0x1234500000 up, nowhere near guest RAM). Each of those
maps reaches our server as a vfio-user DMA_MAP (the guest's IOMMU page tables, QEMU's
intel-iommu notifier), so a ring or buffer address that did not go through the IOMMU faults.
One boot serves every test here: the well-behaved UDP echo verified byte for byte by the host
peer, and the whole hostile catalogue of test_raw_driver.py with the same checks, including the
vIOMMU-only case: unmapping a buffer the device holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from harness.guest import vfio_modules
from harness.testbed import SHELL_CMDLINE, PeerSpec, Testbed, TestbedConfig

from .conftest import need_root
from .test_raw_driver import CASES, _kv, check_hostile_case

pytestmark = pytest.mark.vm
SEED = 11
IOVA_BASE = 0x1234500000
NPAGES = 96  # vnetraw's DMA pages: one VFIO_IOMMU_MAP_DMA each


class Schedule:
    """The next UDP schedule index of this module's peer."""

    next = 0


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    need_root()
    cfg = TestbedConfig(console="socket", cmdline=SHELL_CMDLINE, viommu=True,
                        initrd_add=vfio_modules.ensure(),
                        peers=PeerSpec(udp_count=1_000_000, seed=SEED))
    with Testbed(cfg, tmp_path_factory.mktemp("rawvfio")) as tb:
        tb.wait_shell(180)
        r = tb.guest.run(vfio_modules.insmod_command(), timeout=60)
        assert r.returncode == 0, f"insmod vfio: {r.text} {r.stderr.decode()}"
        yield tb


def _stats(tb: Testbed) -> dict[str, Any]:
    stats = tb.device.stats()
    assert isinstance(stats, dict)
    return stats


def _echo(tb: Testbed, count: int, timeout: int = 120) -> dict[str, str]:
    """vnetraw --vfio udp-echo of the next `count` datagrams; asserts every echo verified."""
    first = Schedule.next
    r = tb.guest.run(f"vnetraw udp-echo --vfio --count {count} --first {first} --seed {SEED} "
                     f"--timeout {timeout}", timeout=timeout + 30)
    assert r.returncode == 0, f"rc={r.returncode} {r.text} {r.stderr.decode()}"
    kv = _kv(r.text)
    assert kv["echoes_ok"] == str(count) and kv["echoes_bad"] == "0", kv
    assert kv["backend"] == "vfio", kv
    Schedule.next = first + count
    return kv


def test_well_behaved_udp_echo_through_the_viommu(testbed: Testbed) -> None:
    before = _stats(testbed)
    kv = _echo(testbed, 200)
    print(kv)
    after = _stats(testbed)
    # The rings live at the IOVAs vnetraw chose, not at guest-physical addresses.
    assert int(kv["rx0_desc"], 16) == IOVA_BASE, kv
    assert kv["status"] == "0xf", kv
    # Every VFIO_IOMMU_MAP_DMA of the guest arrived as a vfio-user DMA_MAP (and the container's
    # close at exit as DMA_UNMAPs): one per page at least (the kernel's own maps come on top).
    maps = after["dma"]["maps"] - before["dma"]["maps"]
    unmaps = after["dma"]["unmaps"] - before["dma"]["unmaps"]
    print(f"vfio-user DMA_MAP +{maps}, DMA_UNMAP +{unmaps}")
    assert maps >= NPAGES and unmaps >= NPAGES, (maps, unmaps)
    dev, dev0 = after["device"], before["device"]
    assert dev["tx0"]["packets"] - dev0["tx0"]["packets"] >= 201
    assert dev["rx0"]["packets"] - dev0["rx0"]["packets"] >= 201
    assert dev["errors"] == dev0["errors"] and dev["device_errors"] == dev0["device_errors"]
    assert after["ledger"]["violations_total"] == 0, after["ledger"]


@pytest.mark.parametrize("case", list(CASES))
def test_hostile_case_behind_the_viommu(testbed: Testbed, case: str) -> None:
    """The whole catalogue again, every address the device gets now an IOVA of the guest's
    IOMMU domain; unmap-held-buffer (vIOMMU only) unmaps a buffer in the avail ring before
    the kick: NEEDS_RESET naming that IOVA, unmapped_iova counted, never touched."""
    check_hostile_case(testbed, case, lambda: _echo(testbed, 10), flags="--vfio")


def test_zz_the_peer_verified_every_datagram(testbed: Testbed) -> None:
    assert Schedule.next > 0
    log = (testbed.run_dir / "peer.log").read_text(errors="replace")
    assert "bad datagram" not in log, log[-2000:]
