"""harness.bench.timeline: QEMU's trace of our device read back as a timeline of labelled
events, and the gaps between them charged to each (from, to) pair."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.bench.timeline import (
    EVENTS,
    main,
    marks,
    sides,
    summarize,
    table,
    waited_share,
)

# QEMU 11.1.3's lines (cut short), ours behind intel-iommu: an invalidation, the DMA_MAP it
# causes and its reply, a doorbell with its own (posted) message, an interrupt, an unmap, a
# reply to something else, a reply written before the line of the request it answers (QEMU's
# threads interleave) and a console line.
LOG = """\
2026-12-02T05:43:21.000000Z vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x3 addr 0x1000
2026-12-02T05:43:21.000050Z vfio_user_dma_map  iova 0x1000 size 0x1000 off 0x0 flags 0x3
2026-12-02T05:43:21.000060Z vfio_user_send_write  id 0x10 wrote 0x30
2026-12-02T05:43:21.000210Z vfio_user_recv_hdr  (unix:n.sock) id 0x10 cmd 0x2 size 0x10 flags 0x1
2026-12-02T05:43:21.000300Z vfio_region_write  (0000:00:03.0:region0+0x3004, 0x1, 2)
2026-12-02T05:43:21.000310Z vfio_user_send_write  id 0x11 wrote 0x22
qemu-system-x86_64: a line that is not a trace event
2026-12-02T05:43:21.000700Z vfio_msi_interrupt  (0000:00:03.0) vector 2 0xfee00000/0x4022
2026-12-02T05:43:21.000800Z vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x3 addr 0x1000
2026-12-02T05:43:21.000840Z vfio_user_dma_unmap  iova 0x1000 size 0x1000 flags 0x0
2026-12-02T05:43:21.000850Z vfio_user_send_write  id 0x12 wrote 0x28
2026-12-02T05:43:21.000900Z vfio_user_recv_hdr  (unix:n.sock) id 0x12 cmd 0x9 size 0x10 flags 0x0
2026-12-02T05:43:21.001000Z vfio_user_recv_hdr  (unix:n.sock) id 0x12 cmd 0x3 size 0x28 flags 0x1
2026-12-02T05:43:21.000999Z vtd_inv_desc_iotlb_pages iotlb invalidate domain 0x3 addr 0x2000
"""


def test_marks_label_requests_replies_doorbells_and_interrupts_in_time_order() -> None:
    assert [label for _, label in marks(LOG)] == [
        "inv", "map sent", "map reply", "doorbell", "irq 2", "inv", "unmap sent", "inv",
        "unmap reply"]
    assert marks(LOG)[0][0] % 1_000_000 == 0  # microseconds since the epoch


def test_every_gap_is_charged_to_its_pair_and_waiting_is_sent_to_its_reply() -> None:
    tl = summarize(marks(LOG))
    assert tl.span_us == 1000
    assert sum(us for _, us in tl.pairs.values()) == tl.span_us
    assert tl.pairs[("map sent", "map reply")] == [1, 150]
    assert tl.pairs[("inv", "map sent")] == [1, 60]
    assert tl.pairs[("doorbell", "irq 2")] == [1, 400]
    assert tl.counts == {"inv": 3, "map sent": 1, "map reply": 1, "doorbell": 1, "irq 2": 1,
                         "unmap sent": 1, "unmap reply": 1}
    # the map's 150 us and the unmap's 150, though an invalidation came in between
    assert tl.waited_us == 300 and waited_share(tl) == pytest.approx(0.3)
    text = table(tl, top=3)
    assert "doorbell -> irq 2" in text and "(5 more pairs)" in text
    assert "a DMA request out, its reply not back: 30% of the window" in text


def test_an_empty_window_is_a_table_not_a_traceback() -> None:
    tl = summarize(marks("qemu-system-x86_64: nothing traced\n"))
    assert tl.span_us == 0 and waited_share(tl) == 0.0
    assert "window 0.000 s" in table(tl)


def test_events_and_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert {"vfio_user_send_write", "vfio_region_write", "vfio_msi_interrupt",
            "vtd_inv_desc_iotlb_pages", "virtio_queue_notify", "virtio_notify"} <= set(EVENTS)
    with pytest.raises(SystemExit):
        main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "where the guest's time goes, as the gaps" in out and "``" not in out
    for bad in (["--bytes", "17M"], ["--bytes", "0"], ["--top", "0"], ["--config", "x"],
                ["--device", "x"]):
        with pytest.raises(SystemExit) as exc:
            main(bad)
        assert exc.value.code == 2
        assert "Traceback" not in capsys.readouterr().err


# QEMU's built-in virtio-net-pci: a TX doorbell names its queue and virtqueue, so the TX
# interrupt is "irq q1"; the RX queue's interrupt before any RX doorbell is "irq q?".
BUILTIN = """\
2026-12-02T08:30:00.000000Z virtio_queue_notify vdev 0x5600aa n 1 vq 0x5600c0
2026-12-02T08:30:00.000400Z virtio_notify vdev 0x5600aa vq 0x5600b0
2026-12-02T08:30:00.000500Z virtio_notify vdev 0x5600aa vq 0x5600c0
2026-12-02T08:30:00.000900Z virtio_queue_notify vdev 0x5600aa n 0 vq 0x5600b0
2026-12-02T08:30:00.001000Z virtio_notify vdev 0x5600aa vq 0x5600b0
"""


def test_the_builtin_devices_doorbells_and_interrupts_are_marked_by_queue() -> None:
    assert [label for _, label in marks(BUILTIN)] == [
        "doorbell", "irq q?", "irq q1", "doorbell", "irq q0"]
    tl = summarize(marks(BUILTIN))
    assert tl.pairs[("doorbell", "irq q?")] == [1, 400]
    assert tl.pairs[("irq q1", "doorbell")] == [1, 400]
    assert "DMA request" not in table(tl)  # no vIOMMU, no DMA requests: no such line
    # device side: doorbell -> irq q? 400, irq q? -> irq q1 100, doorbell -> irq q0 100;
    # guest side: irq q1 -> doorbell 400; two doorbells
    assert sides(tl) == (600, 400)
    assert ("device side (to an interrupt) 60.0%, 300.0 us per doorbell; guest side (to a "
            "doorbell) 40.0%, 200.0 us per doorbell") in table(tl)
    # behind a vIOMMU the DMA gaps are in neither side
    assert sides(summarize(marks(LOG))) == (400, 0)


def test_the_run_can_be_ours_without_a_viommu_or_the_builtin_device(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        tmp_path: Path) -> None:
    from harness import paths
    from harness.bench import roundtrip

    asked: list[tuple[bool, str, bool]] = []

    def traced(command: str, run_dir: Path, events: tuple[str, ...], *, viommu: bool = True,
               device: str = "ours", offloads: bool = False
               ) -> tuple[str, dict[str, object], str]:
        assert events == EVENTS
        asked.append((viommu, device, offloads))
        return BUILTIN, {}, "ok"

    monkeypatch.setattr(roundtrip, "run_traced", traced)
    monkeypatch.setattr(paths, "build_dir", lambda: tmp_path)
    assert main(["--config", "plain", "--device", "builtin"]) == 0
    assert main([]) == 0
    assert main(["--config", "plain", "--offloads"]) == 0
    assert asked == [(False, "builtin", False), (True, "ours", False), (False, "ours", True)]
    out = capsys.readouterr().out
    assert "builtin device, plain; guest: hnet tcp-send" in out and "irq q1 -> doorbell" in out
    assert "ours device, plain+offloads; guest" in out
