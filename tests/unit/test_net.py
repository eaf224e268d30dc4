"""virtio-net device: TX/RX byte-exactness, mergeable buffers, starvation, counters, options."""

from __future__ import annotations

import struct

import pytest

from harness.testing.mockdriver import NetRig, net_rig
from harness.virtio import constants as C
from harness.virtio.net import DEFAULT_FEATURES, OFFLOAD_FEATURES, VirtioNetDevice

NO_MRG = DEFAULT_FEATURES & ~(1 << C.NET_F_MRG_RXBUF)


def hdr(flags: int = 0, gso: int = 0, num_buffers: int = 0) -> bytes:
    return struct.pack("<BBHHHHH", flags, gso, 54, 1448, 34, 16, num_buffers)


def frame(n: int, seed: int = 0) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(n))


def qstat(r: NetRig, queue: str, key: str) -> int:
    per = r.device.stats()[queue]
    assert isinstance(per, dict)
    return int(per[key])


def test_tx_frame_reaches_backend_byte_exact() -> None:
    r = net_rig(features=DEFAULT_FEATURES | OFFLOAD_FEATURES)
    h = hdr(flags=1, gso=1)  # NEEDS_CSUM + TCPV4: passed through untouched
    data = frame(3000)
    r.tx.add([h + data[:100], data[100:2000], data[2000:]])
    r.tx.kick()
    r.device.process()
    assert r.backend.tx == [h + data]
    assert qstat(r, "tx0", "bytes") == 3000


def test_tx_backend_error_drops_and_completes() -> None:
    r = net_rig()
    r.backend.fail_writes = True
    r.tx.add([hdr() + b"lost"])
    r.tx.kick()
    r.device.process()
    assert r.tx.get_used() == [(0, 0)]
    assert qstat(r, "tx0", "drops") == 1 and qstat(r, "tx0", "packets") == 0
    assert not r.device.status & C.STATUS_NEEDS_RESET


def post_rx(r: NetRig, n: int, size: int) -> None:
    for _ in range(n):
        r.rx.add(in_=[size])
    r.rx.kick()
    r.device.process()


def receive(r: NetRig) -> list[tuple[int, bytes]]:
    """Reassemble delivered frames the way Linux does: num_buffers says how many used entries."""
    used = r.rx.get_used()
    out = []
    while used:
        head, n = used.pop(0)
        first = r.rx.written(head, n)
        (num,) = struct.unpack_from("<H", first, 10)
        data = first
        for _ in range(num - 1):
            h2, n2 = used.pop(0)
            data += r.rx.written(h2, n2)
        out.append((num, data))
    return out


def test_rx_small_frame_one_buffer() -> None:
    r = net_rig()
    post_rx(r, 8, 1536)
    f = hdr() + frame(60)
    r.backend.rx.append(f)
    assert r.device.rx_wanted()
    r.device.on_backend_readable()
    assert receive(r) == [(1, f[:10] + b"\x01\x00" + f[12:])]
    assert r.irq.vectors == [1]


def test_rx_merged_buffers_num_buffers() -> None:
    r = net_rig()
    post_rx(r, 16, 512)
    big = hdr() + frame(1200, 3)  # 1212 bytes -> 512 + 512 + 188
    small = hdr() + frame(40, 9)
    r.backend.rx.extend([big, small, big])
    r.device.on_backend_readable()
    got = receive(r)
    expect_big = big[:10] + b"\x03\x00" + big[12:]
    assert got == [(3, expect_big), (1, small[:10] + b"\x01\x00" + small[12:]), (3, expect_big)]
    assert r.irq.vectors == [1]  # one interrupt for the batch of three frames
    assert qstat(r, "rx0", "packets") == 3
    assert qstat(r, "rx0", "bytes") == 1200 + 40 + 1200
    # 7 buffers used, the ones gathered but not needed went back: 9 remain for the next frames.
    r.backend.rx.extend([big, big, big])
    r.device.on_backend_readable()
    assert len(receive(r)) == 3


def test_rx_without_mrg_needs_one_big_chain() -> None:
    r = net_rig(features=NO_MRG)
    post_rx(r, 2, 1530)
    f = hdr() + frame(1500)
    r.backend.rx.append(f)
    r.device.on_backend_readable()
    assert receive(r) == [(1, f[:10] + b"\x01\x00" + f[12:])]


def test_rx_no_buffers_stops_polling_and_resumes_on_kick() -> None:
    r = net_rig()
    f = hdr() + frame(100)
    r.backend.rx.append(f)
    assert r.device.rx_wanted()
    r.device.on_backend_readable()
    assert not r.device.rx_wanted()  # stop polling the backend: no busy spin
    assert list(r.backend.rx) == [f]  # the frame waits in the backend
    assert qstat(r, "rx0", "no_buffers") == 1
    assert r.rx.avail_event() == 0  # kick me on the next buffer
    r.device.on_backend_readable()  # a stray call is harmless
    r.rx.add(in_=[2048])
    assert r.rx.kick_if_needed()  # the driver sees the device asked for a kick
    r.device.process()
    assert r.device.rx_wanted()
    r.device.on_backend_readable()
    assert receive(r) == [(1, f[:10] + b"\x01\x00" + f[12:])]


def test_rx_insufficient_room_waits_for_more_buffers() -> None:
    r = net_rig()
    post_rx(r, 1, 1024)  # < one max-size frame, and the ring could hold more
    r.backend.rx.append(hdr() + frame(100))
    r.device.on_backend_readable()
    assert not r.device.rx_wanted() and r.rx.get_used() == []
    post_rx(r, 1, 1024)
    assert r.device.rx_wanted()
    r.device.on_backend_readable()
    assert [n for n, _ in receive(r)] == [1]


def test_rx_ring_full_of_small_buffers_is_used_anyway() -> None:
    r = net_rig(queue_size=4)
    post_rx(r, 4, 256)  # the whole ring holds 1024 bytes < 1530: waiting could never help
    f = hdr() + frame(500)
    r.backend.rx.append(f)
    r.device.on_backend_readable()
    assert receive(r) == [(2, f[:10] + b"\x02\x00" + f[12:])]


def test_rx_chain_with_readable_buffer_is_an_error() -> None:
    r = net_rig()
    r.rx.add([b"readable" * 2], [2048])
    r.rx.kick()
    r.device.process()
    r.backend.rx.append(hdr() + frame(10))
    r.device.on_backend_readable()
    assert r.device.status & C.STATUS_NEEDS_RESET and qstat(r, "rx0", "errors") == 1
    assert r.irq.vectors == [0]


def test_rx_chain_too_small_for_header_is_an_error() -> None:
    r = net_rig()
    post_rx(r, 1, 8)
    r.backend.rx.append(hdr() + frame(10))
    r.device.on_backend_readable()
    assert r.device.status & C.STATUS_NEEDS_RESET


def test_rx_runt_frame_dropped() -> None:
    r = net_rig()
    post_rx(r, 4, 2048)
    r.backend.rx.extend([b"tiny", hdr() + b"ok"])
    r.device.on_backend_readable()
    assert qstat(r, "rx0", "drops") == 1
    assert [d[12:] for _, d in receive(r)] == [b"ok"]


def test_rx_not_before_driver_ok() -> None:
    r = net_rig(init=False)
    assert not r.device.rx_wanted()
    r.device.on_backend_readable()
    r.device.process()
    assert r.device.stats()["errors"] == 0


def test_gso_negotiation_raises_rx_frame_max() -> None:
    r = net_rig(features=DEFAULT_FEATURES | OFFLOAD_FEATURES)
    post_rx(r, 64, 4096)
    f = hdr(gso=1) + frame(60000)
    r.backend.rx.append(f)
    r.device.on_backend_readable()
    [(num, data)] = receive(r)
    assert num == 15 and data[12:] == f[12:]


def test_feature_options() -> None:
    assert net_rig(init=False).device.device_features == DEFAULT_FEATURES
    with pytest.raises(ValueError):
        net_rig(features=DEFAULT_FEATURES | (1 << C.F_RING_PACKED))
    with pytest.raises(ValueError):
        net_rig(features=DEFAULT_FEATURES & ~(1 << C.F_VERSION_1))
    dev = net_rig(init=False).device
    with pytest.raises(ValueError):
        VirtioNetDevice(dev.mapops, dev.irq, dev.backend, mac=b"\x00", bus_master=lambda: True)


def test_stats_shape() -> None:
    r = net_rig()
    r.tx.add([hdr() + b"abc"])
    r.tx.kick()
    r.device.process()
    s = r.device.stats()
    assert set(s) >= {"rx0", "tx0", "totals", "errors", "bad_accesses", "resets", "needs_reset"}
    assert qstat(r, "totals", "packets") == 1 and qstat(r, "totals", "interrupts") == 1
    assert s["errors"] == 0


def test_rx_no_notify_flag_without_event_idx() -> None:
    r = net_rig(features=DEFAULT_FEATURES & ~(1 << C.F_EVENT_IDX))
    post_rx(r, 4, 2048)
    r.backend.rx.append(hdr() + frame(10))
    r.device.on_backend_readable()
    assert r.rx.used_flags() == C.USED_F_NO_NOTIFY  # buffers in hand: refills need no kick
    assert not r.rx.kick_needed()
    r.backend.rx.extend([hdr() + frame(10)] * 4)
    r.device.on_backend_readable()  # uses the other 3, then starves
    assert not r.device.rx_wanted() and r.rx.used_flags() == 0
    r.rx.add(in_=[2048])
    assert r.rx.kick_if_needed()
    r.device.process()
    r.device.on_backend_readable()
    assert len(receive(r)) == 5 and not r.backend.rx
