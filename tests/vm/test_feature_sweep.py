"""The feature-matrix sweep: the guest's traffic plan under 8 device feature configurations.

The first 8 configurations cover every pair of values of mrg_rxbuf, the checksum/TSO offloads,
event_idx, indirect and mtu=9000 (pairwise: each two of these five switches take all four
on/off combinations in some configuration), with map-ops bounce and a vIOMMU in some of them.
Each is its own pytest item: one guest boot running TCP both ways (verified by the receiving
side) and the UDP echo (verified by the host), small enough that the whole sweep stays within
its share of `make test`. Each checks that the stock Linux driver really ran with the features
offered (the device's features at DRIVER_OK) and, with mtu=9000, that the guest's interface
took the MTU and that jumbo frames moved (without offloads the average frame is past 1514
bytes, so the byte-for-byte TCP check ran over 9000-byte frames). Throughput both ways goes
into the JUnit properties and the table at the end of the pytest output.

The ``mq4`` cell offers 4 queue pairs (``mq=4``) to a 2-vCPU guest: Linux's virtio_net enables
min(CPUs, pairs) = 2 with VQ_PAIRS_SET, and the cell checks that value, that traffic moved on
more than one pair (the host kernel steers flows over the TAP's queues, the guest picks its TX
queue by CPU), and that nothing moved on the pairs the driver left off (5.1.6.5.5); the
per-queue packet counts go into the table.

The two ``packed`` cells offer VIRTIO_F_RING_PACKED (``packed=on``): every queue a packed ring
(virtio 1.3 2.8). One with everything else at its default, one with mrg_rxbuf, event_idx and
indirect off behind a vIOMMU (big RX buffers as multi-descriptor chains in the ring, the
ENABLE/DISABLE event flags instead of off_wrap, every buffer through the IOMMU); each checks
that the driver took the packed ring and that the device's queues were packed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from harness.report import RunResult
from harness.runner import VmTestConfig, run_vm_test
from harness.virtio import constants as C
from harness.virtio.features import parse

from .conftest import SUMMARIES, need_root, record

pytestmark = pytest.mark.vm

MIB = 1 << 20
PLAN = {"link_up", "ping_host", "tcp_guest_to_host", "tcp_host_to_guest", "udp_mixed",
        "host_verified_tcp_guest_to_host", "host_verified_udp", "device_counters_match_tap",
        "device_no_errors"}  # fmt: skip
#: Feature bits the stock driver is expected to take whenever they are offered.
CHECKED_BITS = (
    (1 << C.NET_F_CSUM) | (1 << C.NET_F_GUEST_CSUM) | (1 << C.NET_F_HOST_TSO4)
    | (1 << C.NET_F_HOST_TSO6) | (1 << C.NET_F_GUEST_TSO4) | (1 << C.NET_F_GUEST_TSO6)
    | (1 << C.NET_F_MRG_RXBUF) | (1 << C.F_EVENT_IDX) | (1 << C.F_INDIRECT_DESC)
    | (1 << C.NET_F_MTU) | (1 << C.NET_F_CTRL_VQ) | (1 << C.NET_F_CTRL_RX)
    | (1 << C.NET_F_CTRL_MAC_ADDR) | (1 << C.NET_F_MQ) | (1 << C.F_RING_PACKED)
)  # not CTRL_RX_EXTRA: offered in the ctrl cell, Linux's virtio_net does not take it


@dataclass(frozen=True)
class Cell:
    name: str
    features: str
    map_ops: str = "direct"
    viommu: bool = False
    #: Bytes each TCP stream moves.
    tcp_mib: int = 16


# mrg offl evt ind mtu: see the module docstring for the pairwise property.
CELLS = [
    Cell("defaults", ""),
    Cell("all-off", "mrg_rxbuf=off,offloads=off,event_idx=off,indirect=off"),
    Cell("nomrg-jumbo", "mrg_rxbuf=off,indirect=off,mtu=9000"),
    Cell("nooffl-noevt-jumbo", "offloads=off,event_idx=off,mtu=9000"),
    Cell("nomrg-noevt-bounce", "mrg_rxbuf=off,event_idx=off", map_ops="bounce"),
    Cell("nooffl-noind-viommu", "offloads=off,indirect=off", viommu=True),
    Cell("nomrg-nooffl-jumbo-bounce", "mrg_rxbuf=off,offloads=off,mtu=9000", map_ops="bounce"),
    Cell("noevt-noind-jumbo-viommu", "event_idx=off,indirect=off,mtu=9000", viommu=True),
    # The control queue (off by default): Linux programs RX modes and its MAC table through it.
    Cell("ctrl-rx", "ctrl_vq=on,ctrl_rx=on,ctrl_rx_extra=on,ctrl_mac_addr=on"),
    # Multiqueue: 4 pairs offered, the 2-vCPU guest enables 2 (see the module docstring).
    Cell("mq4", "mq=4"),
    # Packed virtqueues (off by default): with the defaults, and with the ring features off.
    Cell("packed", "packed=on"),
    # 4 MiB: its big RX buffers (17 pages each, all mapped through the vIOMMU at every refill,
    # one vfio-user DMA_MAP per page, whatever the frame's size) made 16 MiB host->guest take
    # 35 s of the 64 s the cell took in the gate of 2026-12-01, on a slower machine.
    Cell("packed-nomrg-noevt-noind", "packed=on,mrg_rxbuf=off,event_idx=off,indirect=off",
         viommu=True, tcp_mib=4),
]
#: The guest's vCPUs (harness.testbed's default -smp): Linux enables min(CPUs, max pairs).
GUEST_CPUS = 2
ROWS: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def table() -> Iterator[None]:
    yield
    if ROWS:
        head = (f"{'configuration':27} {'result':6} {'g->h Mbit/s':>11} {'h->g Mbit/s':>11}  "
                "features")
        SUMMARIES.append(("feature sweep", "\n".join([head, *ROWS])))


def _mbps(result: RunResult, name: str) -> float:
    case = result.case(name)
    return float(case.metrics.get("mbps", 0)) if case is not None else 0.0


@pytest.mark.parametrize("cell", CELLS, ids=lambda c: c.name)
def test_feature_cell(cell: Cell,
                      record_testsuite_property: Callable[[str, object], None]) -> None:
    need_root()
    feats = parse(cell.features)
    result = run_vm_test(VmTestConfig(features=cell.features, map_ops=cell.map_ops,
                                      viommu=cell.viommu, tcp_bytes=cell.tcp_mib * MIB,
                                      udp_count=300))
    record(f"sweep {cell.name}", result)
    g2h, h2g = _mbps(result, "tcp_guest_to_host"), _mbps(result, "tcp_host_to_guest")
    # Suite properties (JUnit xunit2 keeps no per-test properties), one name per cell.
    record_testsuite_property(f"sweep.{cell.name}.features", feats.spec() or "defaults")
    record_testsuite_property(f"sweep.{cell.name}.mbps_guest_to_host", g2h)
    record_testsuite_property(f"sweep.{cell.name}.mbps_host_to_guest", h2g)
    failed = [f"{c.name}: {c.detail}" for c in result.failed]
    ok = result.error is None and not failed and {c.name for c in result.cases if c.ok} >= PLAN
    dev = result.device_stats.get("device") or {}
    spread = ""
    mq_error: AssertionError | None = None
    if feats.mq is not None:
        try:
            _check_mq(dev, feats.mq)
        except AssertionError as exc:  # the row says FAIL too; raised after it is written
            mq_error = exc
            ok = False  # packets per queue pair, "rx a/b/.. tx c/d/.."
        per = {k: "/".join(str(_get_packets(dev, f"{k}{i}")) for i in range(feats.mq))
               for k in ("rx", "tx")}
        spread = (f" [pairs set {(dev.get('ctrl') or {}).get('pairs_set')}: rx {per['rx']} "
                  f"tx {per['tx']}]")
        record_testsuite_property(f"sweep.{cell.name}.per_queue_packets", spread.strip(" []"))
    ROWS.append(f"{cell.name:27} {'pass' if ok else 'FAIL':6} {g2h:11.0f} {h2g:11.0f}  "
                f"{feats.spec() or 'defaults'}{' bounce' if cell.map_ops == 'bounce' else ''}"
                f"{' viommu' if cell.viommu else ''}{spread}")
    assert result.error is None, result.error
    assert not failed, failed
    assert {c.name for c in result.cases if c.ok} >= PLAN
    # The guest ran with exactly the switches of this cell (the driver takes all of these).
    assert dev["driver_ok_features"] & CHECKED_BITS == feats.bits & CHECKED_BITS, \
        f"{dev['driver_ok_features']:#x} vs offered {feats.bits:#x}"
    assert dev["header_drops"] == 0 and dev["oversize_drops"] == 0, dev
    if "ctrl" in dev:  # the driver used the control queue (RX mode, MAC table), no refusals
        assert dev["ctrl"]["commands"] > 0 and dev["ctrl"]["errors"] == 0, dev["ctrl"]
    if mq_error is not None:
        raise mq_error
    # The ring format the queues ran in (their ring_state says "packed").
    assert all(bool(dev[q].get("packed")) == ("packed" in feats.on) for q in ("rx0", "tx0")), \
        {q: dev[q].get("packed") for q in ("rx0", "tx0")}
    if feats.mtu is not None:
        link = result.case("link_up")
        assert link is not None and int(link.metrics.get("mtu", 0)) == feats.mtu
        if not feats.offloads:  # no GSO: every frame on the wire is at most the MTU
            for q in ("tx0", "rx0"):
                packets, nbytes = dev[q]["packets"], dev[q]["bytes"]
                assert nbytes / packets > 2000, (q, packets, nbytes)


def _get_packets(dev: dict[str, Any], queue: str) -> int:
    q = dev.get(queue)
    return int(q.get("packets", 0)) if isinstance(q, dict) else 0


def _check_mq(dev: dict[str, Any], max_pairs: int) -> None:
    """The driver enabled min(CPUs, pairs) pairs, traffic used more than one of them in each
    direction, and none moved on a pair it left off."""
    want = min(GUEST_CPUS, max_pairs)
    # pairs_set: the driver's last VQ_PAIRS_SET (the stats are taken after the final reset).
    assert (dev.get("ctrl") or {}).get("pairs_set") == want, ("VQ_PAIRS_SET", dev.get("ctrl"))
    for kind in ("rx", "tx"):  # each direction spread: the host's steering and the guest's
        used = [i for i in range(max_pairs) if _get_packets(dev, f"{kind}{i}") > 0]
        assert len(used) > 1, (f"{kind} traffic on one pair only", used)
        assert max(used) < want, (f"{kind} traffic on a pair the driver did not enable", used)
