"""harness.bench.roundtrip: QEMU's trace of DMA round trips, read back (lines from a real run)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from harness import cli
from harness.bench.roundtrip import main, parse, summarize, table
from harness.vm.qemu import MachinePaths, MachineProfile, full_args, trace_args

# Lines of a real qemu.log (QEMU 11.1.3, ours behind intel-iommu, hnet udp-tx), with a region
# write and its reply, a console line, a request from the server that happens to carry a
# pending id (no reply flag) and a map whose reply never came; fields the probe does not read
# are cut short.
LOG = """\
2026-12-01T16:02:15.665906Z vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x3 addr 0xfff7a000
2026-12-01T16:02:15.665988Z vfio_user_dma_map  iova 0xfff7a000 size 0x1000 off 0x1ab1000 ...
2026-12-01T16:02:15.666029Z vfio_user_send_write  id 0x1ec wrote 0x30
2026-12-01T16:02:15.666594Z vfio_user_recv_hdr  (unix:n.sock) id 0x1ec cmd 0x2 size 0x10 flags 0x1
2026-12-01T16:02:15.666695Z vfio_user_region_rw  region 0 offset 0x3004 count 2
2026-12-01T16:02:15.666721Z vfio_user_send_write  id 0x1ed wrote 0x22
qemu-system-x86_64: a line that is not a trace event
2026-12-01T16:02:15.667426Z vfio_user_dma_unmap  iova 0xfff7a000 size 0x1000 flags 0x0 async_ops 0
2026-12-01T16:02:15.667454Z vfio_user_send_write  id 0x1ee wrote 0x28
2026-12-01T16:02:15.667100Z vfio_user_recv_hdr  (unix:n.sock) id 0x1ed cmd 0x6 size 0x10 flags 0x1
2026-12-01T16:02:15.667800Z vfio_user_recv_hdr  (unix:n.sock) id 0x1ee cmd 0x9 size 0x10 flags 0x0
2026-12-01T16:02:15.667996Z vfio_user_recv_hdr  (unix:n.sock) id 0x1ee cmd 0x3 size 0x28 flags 0x1
2026-12-01T16:02:15.670927Z vfio_user_dma_map  iova 0xfff7b000 size 0x1000 off 0x1ab2000 ...
2026-12-01T16:02:15.670930Z vfio_user_send_write  id 0x1ef wrote 0x30
"""


def test_each_request_is_paired_with_its_reply_by_id() -> None:
    win = parse(LOG)
    got = [(t.kind, round(t.wait * 1e6)) for t in win.trips]
    # The region write (0x1ed) is no DMA request, the server's request is no reply to 0x1ee,
    # and the last map has no reply in the window: only the two DMA round trips count.
    assert got == [("map", 565), ("unmap", 542)]
    assert win.span == pytest.approx(0.670930 - 0.665906, abs=1e-6)


def test_summary_puts_the_server_reply_beside_the_guest_wait() -> None:
    server = {"map_library": {"count": 1, "p50_us": 18.8}, "map_callback": {"p50_us": 31.4},
              "unmap_library": {"p50_us": 12.5}, "map_reply": {"p50_us": 900.0}}
    s = summarize(parse(LOG), server)
    assert s["map"] == {"count": 1, "p50_us": 565.0, "p90_us": 565.0, "p99_us": 565.0,
                        "server_library_p50_us": 18.8, "server_callback_p50_us": 31.4}
    assert s["unmap"] == {"count": 1, "p50_us": 542.0, "p90_us": 542.0, "p99_us": 542.0,
                          "server_library_p50_us": 12.5}
    assert s["waited_share"] == pytest.approx((565 + 542) / 5024, abs=1e-3)
    text = table(s)
    assert "DMA_MAP" in text and "565.0 us" in text and "31.4 us" in text
    empty = summarize(parse(""))
    assert empty["map"]["count"] == 0 and empty["waited_share"] is None
    assert "-" in table(empty)


def test_trace_events_reach_qemu_with_timestamps_and_bad_names_are_refused() -> None:
    assert trace_args(()) == []
    assert trace_args(("vfio_user_*", "vtd_inv_desc")) == [
        "-msg", "timestamp=on", "-trace", "enable=vfio_user_*", "-trace", "enable=vtd_inv_desc"]
    with pytest.raises(ValueError, match="trace event"):
        MachineProfile(trace=("vfio,file=/etc/passwd",))
    paths = MachinePaths(kernel=Path("k"), initrd=Path("i"), device_socket=Path("s"),
                         qmp_socket=Path("q"), console_log=Path("c"))
    args = full_args(["qemu"], MachineProfile(trace=("vtd_*",)), paths)
    assert args[-4:] == ["-msg", "timestamp=on", "-trace", "enable=vtd_*"]
    assert "-msg" not in full_args(["qemu"], MachineProfile(), paths)
    assert cli._trace_events("vfio_user_dma_*, vtd_inv_*") == ("vfio_user_dma_*", "vtd_inv_*")
    for bad in ("", ",", "a=b", "vfio file"):
        with pytest.raises(argparse.ArgumentTypeError):
            cli._trace_events(bad)


def test_help_says_what_the_probe_measures(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "what the guest waits for each DMA_MAP/UNMAP behind a vIOMMU, seen from QEMU's side" \
        in out
    assert "``" not in out
