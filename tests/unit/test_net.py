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
        net_rig(features=DEFAULT_FEATURES | (1 << 35))  # VIRTIO_F_IN_ORDER: not implemented
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


# ---- RX headers the driver negotiated, offloads handed to the backend, MTU -----------------

GUEST_CSUM = 1 << C.NET_F_GUEST_CSUM
GUEST_TSO4 = 1 << C.NET_F_GUEST_TSO4
GUEST_TSO6 = 1 << C.NET_F_GUEST_TSO6
ALL = DEFAULT_FEATURES | OFFLOAD_FEATURES


def inet_csum(data: bytes) -> int:
    """RFC 1071, computed the textbook way (big-endian words), to check the device's."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def test_negotiated_features_reach_the_backend_at_driver_ok_and_reset_clears_them() -> None:
    r = net_rig(features=ALL, driver_features=DEFAULT_FEATURES | GUEST_CSUM | GUEST_TSO4,
                init=False)
    seen: list[int] = []
    r.device.on_offloads = seen.append
    r.driver.init(DEFAULT_FEATURES | GUEST_CSUM | GUEST_TSO4)
    assert seen[-1] == r.device.negotiated and seen[-1] & GUEST_TSO6 == 0
    r.driver.reset()
    assert seen[-1] == 0


@pytest.mark.parametrize(("negotiated", "gso"), [
    (DEFAULT_FEATURES, 1),  # TCPV4 without GUEST_TSO4
    (DEFAULT_FEATURES | GUEST_CSUM | GUEST_TSO4, 4),  # TCPV6 with only TSO4
    (ALL, 3),  # UDP (UFO): never offered
    (ALL, 5),  # UDP_L4 (USO): never offered
    (ALL, 0x81),  # TCPV4 | ECN: GUEST_ECN never offered
])  # fmt: skip
def test_rx_gso_type_not_negotiated_is_dropped_and_counted(negotiated: int, gso: int) -> None:
    r = net_rig(features=ALL, driver_features=negotiated)
    post_rx(r, 40, 2048)  # room for a 64 KiB frame: the device waits for that much with GSO
    r.backend.rx.extend([hdr(flags=1, gso=gso) + frame(100), hdr() + frame(60, 1)])
    r.device.on_backend_readable()
    # The bad frame is gone; the next one uses the buffers it would have taken.
    [(num, data)] = receive(r)
    assert num == 1 and data[12:] == frame(60, 1)
    assert r.device.header_drops == 1 and qstat(r, "rx0", "drops") == 1
    assert not r.device.status & C.STATUS_NEEDS_RESET


def test_rx_partial_checksum_is_finished_for_a_driver_without_guest_csum() -> None:
    # A UDP/IPv4 frame as the stack leaves it with CHECKSUM_PARTIAL: the pseudo-header sum
    # (not complemented) in the checksum field, csum_start at the UDP header.
    payload = bytes(range(256)) * 3 + b"odd"
    src, dst = bytes([198, 18, 0, 1]), bytes([198, 18, 0, 2])
    udp_len = 8 + len(payload)
    pseudo = src + dst + bytes([0, 17]) + udp_len.to_bytes(2, "big")
    partial = (~inet_csum(pseudo)) & 0xFFFF
    udp = (7).to_bytes(2, "big") + (9).to_bytes(2, "big") + udp_len.to_bytes(2, "big")
    udp += partial.to_bytes(2, "big") + payload
    eth = bytes(12) + b"\x08\x00" + bytes(20)  # addresses do not matter for the sum's check
    pkt = eth + udp
    h = struct.pack("<BBHHHHH", 1, 0, 0, 0, 34, 6, 0)
    r = net_rig(features=ALL, driver_features=DEFAULT_FEATURES)
    post_rx(r, 4, 2048)
    r.backend.rx.append(h + pkt)
    r.device.on_backend_readable()
    [(_, data)] = receive(r)
    assert data[0] == 0 and data[1] == 0  # flags cleared, gso NONE
    got_udp = data[12 + 34 :]
    assert inet_csum(pseudo + got_udp) == 0  # the checksum now verifies
    assert got_udp[8:] == payload and r.device.csum_completed == 1


@pytest.mark.parametrize(("start", "offset"), [(95, 6), (0xFFF0, 16), (34, 7)])
def test_rx_partial_checksum_outside_the_frame_is_dropped(start: int, offset: int) -> None:
    r = net_rig(features=ALL, driver_features=DEFAULT_FEATURES)
    post_rx(r, 4, 2048)
    r.backend.rx.append(struct.pack("<BBHHHHH", 1, 0, 0, 0, start, offset, 0) + frame(100))
    r.device.on_backend_readable()
    assert receive(r) == [] and r.device.header_drops == 1


def test_rx_flags_pass_through_with_guest_csum() -> None:
    r = net_rig(features=ALL, driver_features=DEFAULT_FEATURES | GUEST_CSUM)
    post_rx(r, 4, 2048)
    r.backend.rx.extend([hdr(flags=1) + frame(100), hdr(flags=2) + frame(100)])
    r.device.on_backend_readable()
    assert [d[0] for _, d in receive(r)] == [1, 2]


def mtu_rig(mtu: int, features: int, driver_features: int | None = None) -> NetRig:
    r = net_rig(features=features, init=False, mem_size=8 << 20)
    dev = VirtioNetDevice(r.device.mapops, r.irq, r.backend, mac=r.device.mac,
                          features=features | (1 << C.NET_F_MTU), mtu=mtu,
                          bus_master=lambda: True)
    r2 = NetRig(dev, type(r.driver)(dev, r.driver.mem), r.backend, r.irq, r.bus_master)
    r2.driver.init(driver_features)
    return r2


def test_mtu_config_field_and_rx_sizing() -> None:
    r = mtu_rig(9000, DEFAULT_FEATURES)
    assert r.device.negotiated >> C.NET_F_MTU & 1
    assert r.driver.read(C.DEVICE_OFFSET + 10, 2) == 9000
    assert r.driver.read(C.DEVICE_OFFSET + 8, 2) == 1  # max_virtqueue_pairs
    post_rx(r, 16, 1500)
    jumbo = frame(9018, 3)
    r.backend.rx.extend([hdr() + jumbo, hdr() + frame(9019)])  # the second is over the MTU
    r.device.on_backend_readable()
    [(num, data)] = receive(r)
    assert num == 7 and data[12:] == jumbo  # byte for byte over 7 mergeable buffers
    assert r.device.oversize_drops == 1


def test_mtu_without_mrg_rxbuf_needs_one_chain_for_a_jumbo_frame() -> None:
    r = mtu_rig(9000, NO_MRG)
    post_rx(r, 2, 9000 + 18 + 12)
    r.backend.rx.append(hdr() + frame(9018))
    r.device.on_backend_readable()
    [(num, data)] = receive(r)
    assert num == 1 and data[12:] == frame(9018)


def test_mtu_needs_its_feature_bit() -> None:
    dev = net_rig(init=False).device
    with pytest.raises(ValueError):
        VirtioNetDevice(dev.mapops, dev.irq, dev.backend, mac=dev.mac, mtu=9000,
                        bus_master=lambda: True)
    with pytest.raises(ValueError):
        VirtioNetDevice(dev.mapops, dev.irq, dev.backend, mac=dev.mac, mtu=60,
                        features=DEFAULT_FEATURES | (1 << C.NET_F_MTU), bus_master=lambda: True)


@pytest.mark.parametrize("flags", [4, 0x80, 1 | 4, 2 | 0xF8])
def test_rx_rsc_info_and_undefined_flags_never_reach_the_driver(flags: int) -> None:
    # RSC_EXT is never offered (5.1.6.4.1: without it, no RSC_INFO); undefined bits neither.
    r = net_rig(features=ALL, driver_features=DEFAULT_FEATURES | GUEST_CSUM)
    post_rx(r, 4, 2048)
    r.backend.rx.append(hdr(flags=flags) + frame(100))
    r.device.on_backend_readable()
    [(_, data)] = receive(r)
    assert data[0] == flags & 3


def test_mtu_never_changes() -> None:
    r = mtu_rig(9000, DEFAULT_FEATURES)
    reads = [r.driver.read(C.DEVICE_OFFSET + 10, 2)]
    r.device.set_link(False)
    r.driver.reset()
    r.driver.init()
    reads.append(r.driver.read(C.DEVICE_OFFSET + 10, 2))
    assert reads == [9000, 9000]


@pytest.mark.parametrize("batched", [True, False])
def test_used_idx_published_once_per_batch(monkeypatch: pytest.MonkeyPatch,
                                           batched: bool) -> None:
    """HARNESS_BATCH_USED=1 (the default): one used.idx publish and one interrupt per TX flush
    and per RX batch (without EVENT_IDX, so every publish the driver does not suppress is an
    interrupt); =0, the measurement side, one per frame, a merged RX frame still one."""
    from harness.virtio.net import BATCH_USED_ENV

    if batched:
        monkeypatch.delenv(BATCH_USED_ENV, raising=False)
    else:
        monkeypatch.setenv(BATCH_USED_ENV, "0")
    r = net_rig(features=DEFAULT_FEATURES & ~(1 << C.F_EVENT_IDX))
    for i in range(8):
        r.tx.add([hdr() + frame(60, i)])
    r.tx.kick()
    r.device.process()
    assert len(r.tx.get_used()) == 8
    post_rx(r, 16, 512)
    big = hdr() + frame(1200, 3)  # three buffers, one frame
    r.backend.rx.extend([big, hdr() + frame(40, 9), big])
    r.device.on_backend_readable()
    assert [n for n, _ in receive(r)] == [3, 1, 3]
    tx_irqs, rx_irqs = r.irq.vectors.count(2), r.irq.vectors.count(1)
    assert (tx_irqs, rx_irqs) == ((1, 1) if batched else (8, 3))
    # NO_INTERRUPT is honoured on either side: frames are used, nobody is interrupted.
    r.irq.vectors.clear()
    r.tx.set_avail_flags(C.AVAIL_F_NO_INTERRUPT)
    for i in range(4):
        r.tx.add([hdr() + frame(60, i)])
    r.tx.kick()
    r.device.process()
    assert len(r.tx.get_used()) == 4 and r.irq.vectors == []


def test_batch_used_switch_refuses_a_typo(monkeypatch: pytest.MonkeyPatch) -> None:
    from harness.virtio.net import BATCH_USED_ENV, batch_used

    monkeypatch.setenv(BATCH_USED_ENV, "yes")
    with pytest.raises(ValueError, match=BATCH_USED_ENV):
        batch_used()
