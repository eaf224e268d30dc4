"""Host-side verdicts of a vm-test run: what the peers verified and what the counters say.

The guest judges what it receives; these checks judge the rest from the host: the bytes the
host peers received, the device's own per-queue counters against the TAP's kernel counters
(every frame the device sent must have reached the TAP, every frame the TAP queued must have
been delivered or still be waiting), and the device's error counters.
"""

from __future__ import annotations

from typing import Any

from harness.report import Case

#: virtio-net queue names as the device reports them.
RX, TX = "rx0", "tx0"


def _pair_sum(dev: dict[str, Any], kind: str) -> dict[str, int]:
    """``rx``/``tx`` counters summed over every queue pair (rx0, rx1, ... with multiqueue)."""
    total: dict[str, int] = {}
    for name, q in dev.items():
        if name.startswith(kind) and name[len(kind):].isdigit() and isinstance(q, dict):
            for k in ("packets", "bytes", "drops"):
                total[k] = total.get(k, 0) + int(q.get(k) or 0)
    return total


def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def peer_tcp_check(peer: dict[str, Any], tcp_bytes: int) -> Case:
    name = "host_verified_tcp_guest_to_host"
    t = _get(peer, "tests", "tcp_guest_to_host")
    if not isinstance(t, dict):
        return Case(name, False, "the host peer has no result for tcp_guest_to_host")
    got = int(t.get("bytes") or 0)
    if t.get("ok") is True and got == tcp_bytes:
        return Case(name, True, f"host verified all {got} bytes",
                    {k: t[k] for k in ("bytes", "seconds", "mbps") if k in t})
    why = t.get("error") or f"first mismatch at {t.get('first_mismatch')}"
    return Case(name, False, f"host received {got}/{tcp_bytes} bytes: {why}")


def peer_udp_check(peer: dict[str, Any], udp_count: int) -> Case:
    name = "host_verified_udp"
    u = _get(peer, "tests", "udp_mixed")
    if not isinstance(u, dict):
        return Case(name, False, "the host peer has no result for udp_mixed")
    good, bad = int(u.get("good") or 0), int(u.get("bad") or 0)
    metrics = {k: u[k] for k in ("good", "bad", "dup") if k in u}
    if u.get("ok") is True and bad == 0 and good >= udp_count:
        return Case(name, True, f"host verified {good} datagrams, {bad} bad", metrics)
    return Case(name, False, f"host saw {good} good, {bad} bad of {udp_count} "
                             f"(first bad: {u.get('first_bad')})", metrics)


def counters_check(stats: dict[str, Any]) -> Case:
    """Device TX == TAP RX exactly; TAP TX == device RX + what was left queued at exit."""
    name = "device_counters_match_tap"
    dev, tap = stats.get("device"), stats.get("tap")
    if not isinstance(dev, dict) or not isinstance(tap, dict) or "rx_packets" not in tap:
        return Case(name, False, "device or TAP counters missing (did the server exit cleanly?)")
    tx, rx = _pair_sum(dev, "tx"), _pair_sum(dev, "rx")
    write_errors = int(_get(stats, "tap_backend", "write_errors") or 0)
    undelivered = int(stats.get("tap_undelivered_at_exit") or 0)
    facts = {
        "device_tx_packets": tx.get("packets"), "tap_rx_packets": tap["rx_packets"],
        "device_tx_bytes": tx.get("bytes"), "tap_rx_bytes": tap["rx_bytes"],
        "device_rx_packets": rx.get("packets"), "tap_tx_packets": tap["tx_packets"],
        "device_rx_bytes": rx.get("bytes"), "tap_tx_bytes": tap["tx_bytes"],
        "tap_write_errors": write_errors, "undelivered_at_exit": undelivered,
        "device_rx_drops": rx.get("drops"),
    }
    problems = []
    if tx.get("packets") != tap["rx_packets"] + write_errors:
        problems.append("device tx packets != TAP rx packets + refused writes")
    if write_errors == 0 and tx.get("bytes") != tap["rx_bytes"]:
        problems.append("device tx bytes != TAP rx bytes")
    # Frames the device read and dropped on purpose (runts, headers the driver did not
    # negotiate, the driver's MAC filter, link down) are rx drops: taken from the TAP all the same.
    rx_drops = int(rx.get("drops") or 0)
    if rx.get("packets", 0) + rx_drops + undelivered != tap["tx_packets"]:
        problems.append("device rx packets + drops + undelivered != TAP tx packets")
    if undelivered == 0 and rx_drops == 0 and rx.get("bytes") != tap["tx_bytes"]:
        problems.append("device rx bytes != TAP tx bytes")
    if not tx.get("packets") or not rx.get("packets"):
        problems.append("no traffic counted")
    if problems:
        return Case(name, False, "; ".join(problems), facts)
    return Case(name, True, f"tx {tx['packets']} pkts / rx {rx['packets']} pkts agree with "
                            "the TAP", facts)


def errors_check(stats: dict[str, Any]) -> Case:
    name = "device_no_errors"
    dev = stats.get("device")
    if not isinstance(dev, dict):
        return Case(name, False, "no device counters")
    facts = {k: dev.get(k) for k in ("errors", "device_errors", "bad_accesses", "needs_reset")}
    facts["ledger_violations"] = _get(stats, "ledger", "violations_total")
    facts["failed_vfio_user_replies"] = _get(stats, "dma", "failed_replies")
    # Refusals the library never replies with an error for (a DMA map the device refused is
    # still in libvfio-user's list), and clients dropped or refused at attach.
    facts["failed_callbacks"] = _get(stats, "vfio_user", "callback_failures")
    facts["vfio_user_client_failures"] = _get(stats, "vfio_user", "client_failures")
    if any(facts.values()):
        return Case(name, False, f"device reported problems: {facts}", facts)
    return Case(name, True, "no ring errors, no ledger violations, no failed vfio-user "
                            "replies or callbacks, no failed clients, no NEEDS_RESET", facts)


def guest_iova_check(stats: dict[str, Any]) -> Case:
    """Behind a vIOMMU: the guest's IOVA allocator, as the DMA_MAP/UNMAP stream shows it."""
    name = "guest_iova_clean"
    r = stats.get("guest_iova")
    if not isinstance(r, dict) or "violations_total" not in r:
        return Case(name, False, "no guest-IOVA report (did the server exit cleanly?)")
    hist = r.get("size_histogram") or {}
    top = ", ".join(f"{int(k) // 1024}K x{v}" for k, v in list(hist.items())[:4])
    low = r.get("lowest_iova")
    facts = {k: r.get(k) for k in ("maps", "unmaps", "peak_live", "lowest_iova", "above_4g",
                                   "multi_page", "aligned_multi_page", "violations_total")}
    if r["violations_total"]:
        return Case(name, False, f"{r['violations_total']} violations, first: "
                                 f"{(r.get('violations') or ['?'])[0]}", facts)
    return Case(name, True, f"{r.get('maps')} maps, peak {r.get('peak_live')} live, lowest "
                            f"{low:#x}, sizes {top}" if isinstance(low, int) else
                            "no guest IOMMU mappings seen", facts)


def host_checks(cases: list[Case], peer: dict[str, Any], stats: dict[str, Any],
                tcp_bytes: int, udp_count: int, *, viommu: bool = False) -> list[Case]:
    """The host-side Cases, for whichever guest tests actually ran."""
    ran = {c.name for c in cases if c.ok is not None}
    out: list[Case] = []
    if "tcp_guest_to_host" in ran:
        out.append(peer_tcp_check(peer, tcp_bytes))
    if "udp_mixed" in ran:
        out.append(peer_udp_check(peer, udp_count))
    out.append(counters_check(stats))
    out.append(errors_check(stats))
    if viommu:
        out.append(guest_iova_check(stats))
    return out
