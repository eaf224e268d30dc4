"""HARNESS_RX_PUBLISH: when the C RX burst makes its frames visible to the driver.

``batch`` (the default) publishes used.idx once, after the burst (``Virtqueue.flush``);
``frame`` also after every frame's used entries, so a driver polling its ring (Linux's NAPI on
another vCPU) sees frames as they land. Either way the interrupt is decided once per burst,
over everything the burst used (EVENT_IDX's window from the last decided publish).
"""

from __future__ import annotations

import struct

import pytest

from harness.testing.mockdriver import FdBackend, NetRig, net_rig
from harness.virtio.fastpath import rx_publish_each
from harness.virtio.netdefs import RX_PUBLISH_ENV

HDR = struct.pack("<BBHHHHH", 0, 0, 0, 0, 0, 0, 0)


def _rig() -> NetRig:
    r = net_rig(ledger=True, backend=FdBackend(), bursts=True, queue_size=16)
    assert r.device.fastpath is not None
    for _ in range(8):
        r.rx.add(in_=[1526])
    r.rx.kick()
    r.device.process()
    return r


@pytest.mark.parametrize("mode, seen_before_flush", [("batch", 0), ("frame", 3)])
def test_used_idx_is_visible_per_frame_only_when_asked(
        mode: str, seen_before_flush: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RX_PUBLISH_ENV, mode)
    r = _rig()
    q = r.device.queues[0]
    r.rx.set_used_event(0)  # the driver wants an interrupt at the first frame (EVENT_IDX)
    seen: list[int] = []
    flush = q.flush

    def flush_seen() -> bool:
        seen.append(r.rx.used_idx())  # what the driver could see before the burst's publish
        return flush()

    monkeypatch.setattr(q, "flush", flush_seen)
    assert isinstance(r.device.backend, FdBackend)
    for i in range(3):
        r.device.backend.deliver(HDR + r.device.mac + bytes([i]) * 60)
    before = len(r.irq.vectors)
    r.device.on_backend_readable()
    assert r.device.fastpath is not None and r.device.fastpath.rx_frames == 3
    assert seen == [seen_before_flush]
    assert r.rx.used_idx() == 3
    assert len(r.irq.vectors) - before == 1  # one interrupt for the burst, either way
    assert [n for _, n in r.rx.get_used()] == [len(HDR) + 66] * 3


def test_a_mistyped_value_fails_loudly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(RX_PUBLISH_ENV, "frames")
    with pytest.raises(ValueError, match="expected batch or frame"):
        rx_publish_each()
