"""Results of a vm-test run: the data model, the printed summary and the JUnit XML file."""

from __future__ import annotations

import json
import textwrap
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Case:
    """One test result: ok True/False, or None when skipped."""

    name: str
    ok: bool | None
    detail: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class RunResult:
    """Everything one `harness vm-test` run found out."""

    accel: str
    accel_reason: str
    map_ops: str
    viommu: bool
    faults: str
    qemu_version: str
    kernel_version: str
    run_dir: str
    boot_seconds: float | None = None
    wall_seconds: float = 0.0
    cases: list[Case] = field(default_factory=list)
    device_stats: dict[str, Any] = field(default_factory=dict)
    #: The guest's own counters at the end of its plan (TCP retransmissions, drops, errors).
    guest_net: dict[str, Any] = field(default_factory=dict)
    #: Exactly what ran (harness.paths.Env.provenance) and where it differs from the pins.
    deps: dict[str, str] = field(default_factory=dict)
    drift: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def failed(self) -> list[Case]:
        return [c for c in self.cases if c.ok is False]

    @property
    def ok(self) -> bool:
        return self.error is None and not self.failed and any(c.ok for c in self.cases)

    def case(self, name: str) -> Case | None:
        return next((c for c in self.cases if c.name == name), None)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True, default=str)


def _describe(case: Case) -> str:
    m = case.metrics
    if "mbps" in m and "bytes" in m:
        mib = int(m["bytes"]) / (1 << 20)
        secs = float(m.get("seconds", 0))
        return f"{mib:.0f} MiB in {secs:.2f} s = {float(m['mbps']):.0f} Mbit/s"
    return case.detail


def _dma_lines(stats: dict[str, Any]) -> list[str]:
    """The DMA ledger's and the fault injector's counters, when the device reported them."""
    out = []
    secs = float(stats.get("connected_seconds") or 0) or 1.0
    ledger = stats.get("ledger")
    if isinstance(ledger, dict):
        out.append(
            f"  ledger: {ledger.get('maps', 0)} maps ({ledger.get('maps', 0) / secs:.0f}/s), "
            f"{ledger.get('unmaps', 0)} unmaps, live {ledger.get('live', 0)} "
            f"(peak {ledger.get('peak_live', 0)}), "
            f"violations {ledger.get('violations_total', 0)}, "
            f"revocations {ledger.get('revocations', 0)}, failed maps "
            f"{ledger.get('failed_maps', 0)}")
    dma = stats.get("dma")
    if isinstance(dma, dict):
        maps, unmaps = int(dma.get("maps", 0)), int(dma.get("unmaps", 0))
        out.append(f"  vfio-user DMA_MAP {maps} ({maps / secs:.0f}/s), DMA_UNMAP {unmaps} "
                   f"({unmaps / secs:.0f}/s), failed replies {dma.get('failed_replies', 0)}, "
                   f"peak regions {dma.get('peak_regions', 0)}")
        frag = dma.get("fragmentation")
        if isinstance(frag, dict) and frag:
            out.append(
                f"  IOVA space at its busiest: {frag.get('regions')} regions, "
                f"{int(frag.get('mapped_bytes', 0)) >> 10} KiB mapped, largest free gap below "
                f"4 GiB {int(frag.get('largest_free_below_4g', 0)) >> 20} MiB, free-space "
                f"fragmentation {float(frag.get('free_fragmentation', 0)):.4f}")
    if isinstance(ledger, dict):
        faults = ledger.get("faults")
        if isinstance(faults, dict):
            out.append(f"  faults injected: {json.dumps(faults.get('injected'))}, "
                       f"refused as too large {faults.get('refused_too_large', 0)}")
        mapops = ledger.get("mapops")
        if isinstance(mapops, dict) and mapops.get("mode") == "bounce":
            keys = [k for k in sorted(mapops) if k != "mode"]
            out.append("  bounce: " + ", ".join(f"{k} {mapops[k]}" for k in keys))
    return out


def summary(result: RunResult) -> str:
    """A short human summary: accelerator and why, boot time, each test, throughput."""
    lines = [
        f"harness vm-test: accel {result.accel} ({result.accel_reason})",
        f"  QEMU {result.qemu_version}, guest kernel {result.kernel_version}, "
        f"map-ops {result.map_ops}, vIOMMU {'on' if result.viommu else 'off'}, "
        f"faults {result.faults or 'none'}",
    ]
    lines += [f"  {k}: {v}" for k, v in result.deps.items()]
    # Loud on purpose: results may differ from a run with the pinned versions.
    lines += [f"  WARNING (archive moved on from the pins): {d}" for d in result.drift]
    if result.boot_seconds is not None:
        lines.append(f"  boot: {result.boot_seconds:.1f} s (QEMU start to first KTAP line)")
    for case in result.cases:
        mark = {True: "ok  ", False: "FAIL", None: "skip"}[case.ok]
        lines.append(f"  {mark} {case.name:<28} {_describe(case)}".rstrip())
        excerpt = case.metrics.get("excerpt")
        if case.ok is False and isinstance(excerpt, str):  # a kernel verdict's evidence
            lines += [f"      | {ln}"[:80] for ln in excerpt.splitlines()[:14]]
    g = result.guest_net
    if g:
        lines.append(
            f"  guest: TCP retransmitted segments {g.get('tcp_retrans_segs', '?')}, UDP in-errors "
            f"{g.get('udp_in_errors', '?')}, dropped rx/tx {g.get('rx_dropped', '?')}/"
            f"{g.get('tx_dropped', '?')}, errors rx/tx {g.get('rx_errors', '?')}/"
            f"{g.get('tx_errors', '?')}")
    dev = result.device_stats.get("device")
    if isinstance(dev, dict) and isinstance(dev.get("totals"), dict):
        t = dev["totals"]
        lines.append(f"  device: drops {t.get('drops', 0)}, transient map failures "
                     f"{t.get('map_errors', 0)}, RX starved {t.get('no_buffers', 0)} times")
    if isinstance(dev, dict):
        lines += _burst_lines(dev)
    lines += _dma_lines(result.device_stats)
    if result.error:
        lines.append(f"  error: {result.error}")
    passed = sum(1 for c in result.cases if c.ok)
    skipped = sum(1 for c in result.cases if c.ok is None)
    lines.append(f"  wall time {result.wall_seconds:.0f} s; logs in {result.run_dir}")
    failed = len(result.failed) + (1 if result.error else 0)
    closing = f"vm-test: {passed} passed, {failed} failed"
    if skipped:
        closing += f", {skipped} skipped"
    lines.append(closing)
    return "\n".join(wrapped for line in lines for wrapped in _wrap(line))


def _burst_lines(dev: dict[str, Any]) -> list[str]:
    """How much of the traffic the C bursts carried (harness.virtio.fastpath): what they left
    to the Python path is what a kernel's rings did that they do not take, worth knowing."""
    tx, rx = dev.get("tx_fast_chains"), dev.get("rx_fast_frames")
    if not isinstance(tx, int) or not isinstance(rx, int):
        return []  # a server without them (bounce, faults, a capture): nothing to say

    def total(prefix: str, key: str) -> int:
        return sum(int(q.get(key, 0)) for name, q in dev.items()
                   if name.startswith(prefix) and name[2:].isdigit() and isinstance(q, dict))

    def part(done: int, of: int, what: str) -> str:
        return f"{what} off" if done < 0 else f"{what} {done} of {of}"

    return [f"  C bursts: {part(tx, total('tx', 'chains'), 'TX chains')}, "
            f"{part(rx, total('rx', 'packets'), 'RX frames')}"]


def _wrap(line: str, width: int = 80) -> list[str]:
    """Fit an 80-column terminal: continuation lines indented under the first one's text."""
    if len(line) <= width:
        return [line]
    indent = " " * (len(line) - len(line.lstrip()) + 4)
    return textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False,
                         break_long_words=False)


def write_junit(result: RunResult, path: Path) -> None:
    """JUnit XML, one testcase per Case, for CI systems."""
    suite = ET.Element("testsuite", {
        "name": f"vm-test[{result.accel},{result.map_ops}{',viommu' if result.viommu else ''}]",
        "tests": str(len(result.cases)),
        "failures": str(len(result.failed)),
        "errors": "1" if result.error else "0",
        "skipped": str(sum(1 for c in result.cases if c.ok is None)),
        "time": f"{result.wall_seconds:.3f}",
    })
    props = ET.SubElement(suite, "properties")
    for key, value in (("accel", result.accel), ("accel_reason", result.accel_reason),
                       ("qemu_version", result.qemu_version),
                       *((f"deps_{k}", v) for k, v in result.deps.items()),
                       *((f"drift_{i}", d) for i, d in enumerate(result.drift)),
                       ("boot_seconds", f"{result.boot_seconds or 0:.2f}")):
        ET.SubElement(props, "property", {"name": key, "value": value})
    for case in result.cases:
        tc = ET.SubElement(suite, "testcase", {"classname": "vm", "name": case.name})
        if case.ok is False:
            failure = ET.SubElement(tc, "failure", {"message": case.detail or "failed"})
            excerpt = case.metrics.get("excerpt")
            if isinstance(excerpt, str):
                failure.text = excerpt
        elif case.ok is None:
            ET.SubElement(tc, "skipped", {"message": case.detail or "skipped"})
        if case.metrics:
            ET.SubElement(tc, "system-out").text = json.dumps(case.metrics, sort_keys=True)
    if result.error:
        tc = ET.SubElement(suite, "testcase", {"classname": "vm", "name": "harness"})
        ET.SubElement(tc, "error", {"message": result.error})
    ET.ElementTree(suite).write(path, encoding="utf-8", xml_declaration=True)
