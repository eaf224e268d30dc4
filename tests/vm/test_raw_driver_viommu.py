"""The raw userspace virtio-net driver behind a vIOMMU: vnetraw's vfio backend (--vfio).

The guest boots with intel_iommu=on behind QEMU's intel-iommu; vnetraw binds the device to
vfio-pci, opens a type1v2 container on its IOMMU group and maps each DMA page with
VFIO_IOMMU_MAP_DMA at IOVAs it picks (0x1234500000 up, nowhere near guest RAM). Each of those
maps reaches our server as a vfio-user DMA_MAP (the guest's IOMMU page tables, QEMU's
intel-iommu notifier), so a ring or buffer address that did not go through the IOMMU faults.
One boot serves every test here: the well-behaved UDP echo verified byte for byte by the host
peer, the catalogue cases that are about addresses and mappings, and the vIOMMU-only case:
unmapping a buffer the device holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from harness.guest import vfio_modules
from harness.testbed import SHELL_CMDLINE, PeerSpec, Testbed, TestbedConfig

from .conftest import need_root
from .test_raw_driver import ADDRESS_CASES, CASES, _kv, _violations

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


#: The catalogue cases about addresses and mappings, where an IOMMU changes the path: the
#: addresses the device gets are IOVAs of the guest's IOMMU domain, not guest-physical ones.
VIOMMU_CASES = ["addr-outside-ram", "addr-len-overflow", "len-past-region", "next-out-of-range",
                "readonly-rx", "reset-in-flight", "clear-bus-master", "unmap-held-buffer"]
ALLOWED = {**ADDRESS_CASES, "unmap-held-buffer": {"unmapped_iova"}}


@pytest.mark.parametrize("case", VIOMMU_CASES)
def test_hostile_case_behind_the_viommu(testbed: Testbed, case: str) -> None:
    exp = CASES[case]
    log_start = testbed.device.log.stat().st_size
    before = _stats(testbed)
    r = testbed.guest.run(f"vnetraw hostile {case} --vfio --timeout 30", timeout=90)
    assert r.returncode == 0, f"rc={r.returncode} {r.text} {r.stderr.decode()}"
    kv = _kv(r.text)
    print(f"{case}: {kv}")
    testbed.check_alive()
    after = _stats(testbed)
    dev = after["device"]
    log = testbed.device.log.read_bytes()[log_start:].decode(errors="replace")
    reason = exp.reason
    if case == "unmap-held-buffer":
        assert kv["unmapped"] == "1", kv
        reason = f"{exp.reason}{kv['iova']}"  # the very page the guest unmapped
    if reason is not None:
        assert kv["needs_reset"] == "1", kv
        assert dev["device_errors"] > before["device"]["device_errors"], (before, dev)
        assert f"device needs reset: queue {reason}" in log, log[-2000:]
    else:
        assert kv["needs_reset"] == "0" and "device needs reset" not in log, (kv, log[-2000:])
    assert {k: kv.get(k) for k in exp.obs} == exp.obs, kv
    v0, v1 = _violations(before), _violations(after)
    new = {k: n - v0.get(k, 0) for k, n in v1.items() if n != v0.get(k, 0)}
    assert set(new) <= ALLOWED.get(case, set()), new
    if case == "unmap-held-buffer":
        # Refused and counted: the device never reached the page the guest took back.
        assert new.get("unmapped_iova", 0) >= 1, new
    assert after["ledger"]["live"] == 0, after["ledger"]
    _echo(testbed, 10)
    assert not _stats(testbed)["device"]["needs_reset"]


def test_zz_the_peer_verified_every_datagram(testbed: Testbed) -> None:
    assert Schedule.next > 0
    log = (testbed.run_dir / "peer.log").read_text(errors="replace")
    assert "bad datagram" not in log, log[-2000:]
