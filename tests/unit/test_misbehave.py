"""Misbehaviours: the spec parser, the registry, each hook breaking exactly its one rule (with the
DMA ledger watching), the control command and switches, and classify() on constructed runs."""

from __future__ import annotations

import argparse
import re
import struct
import time

import pytest

from harness.dma import DmaLedger, build_mapops
from harness.misbehave_run import CLASSES, Outcome, case_spec, classify, compare, table
from harness.report import Case, RunResult
from harness.server.cli import parse_args
from harness.server.control import CommandError, Request, device_commands
from harness.testing.mockdriver import FakeBackend, FakeIrq, MockDriver, MockMemory, NetRig
from harness.virtio import constants as C
from harness.virtio import misbehave as misbehave_module
from harness.virtio.misbehave import (
    CASES,
    POINTS,
    PUBLISH_HOLD,
    QUEUES,
    SLOW_SECONDS,
    STUCK_RESET_READS,
    Misbehaviour,
    parse_list,
    spec_list,
)
from harness.virtio.net import VirtioNetDevice

HDR = bytes(12)
RX_VECTOR, TX_VECTOR, CONFIG_VECTOR = 1, 2, 0


# ---- the spec parser ----------------------------------------------------------------------


def test_parse_defaults_and_options() -> None:
    assert Misbehaviour.parse("used-len-zero") == Misbehaviour("used-len-zero")
    m = Misbehaviour.parse("used-len-zero:after=100:queue=rx0:always")
    assert (m.case, m.after, m.queue, m.always) == ("used-len-zero", 100, "rx0", True)
    assert str(m) == "used-len-zero:after=100:queue=rx0:always"
    assert Misbehaviour.parse(str(m)) == m
    assert Misbehaviour.parse("tx-stall:once").always is False
    assert [s.case for s in parse_list("tx-stall, used-len-zero")] == ["tx-stall",
                                                                       "used-len-zero"]


@pytest.mark.parametrize("text, why", [
    ("nonsense", "unknown misbehaviour 'nonsense'"),
    ("used-len-zero:after=x", "is not a whole number"),
    ("used-len-zero:after=-1", "after must be 0 or more"),
    ("used-len-zero:queue=rx9", "queue must be one of rx0, tx0, any"),
    ("used-len-zero:queue=tx0", "used-len-zero acts on rx0, not tx0"),
    ("used-len-zero:sometimes", "unknown option 'sometimes'"),
])
def test_bad_specs_are_one_line_errors(text: str, why: str) -> None:
    with pytest.raises(ValueError, match=re.escape(why)):
        Misbehaviour.parse(text)
    with pytest.raises(argparse.ArgumentTypeError) as exc:
        spec_list(text)
    assert "\n" not in str(exc.value)


def test_spec_list_normalises_and_refuses_empty() -> None:
    assert spec_list("used-len-zero:after=0,tx-stall") == "used-len-zero,tx-stall"
    with pytest.raises(argparse.ArgumentTypeError, match="empty"):
        spec_list(" , ")


# ---- the registry -------------------------------------------------------------------------


def test_registry_every_case_has_clause_bug_class_point() -> None:
    assert len(CASES) >= 8
    for name, case in CASES.items():
        assert case.name == name
        assert re.search(r"\d+\.\d+", case.clause), name  # a section number
        assert case.bug_class and case.what, name
        assert case.point in POINTS, name
        assert case.queues and set(case.queues) <= set(QUEUES) - {"any"}, name


# ---- the hooks, on a device whose map ops carry the ledger ---------------------------------


def rig(*specs: str) -> tuple[NetRig, DmaLedger]:
    mem = MockMemory()
    bme = [True]
    ops, ledger = build_mapops("direct", mem.memory, bus_master=lambda: bme[0])
    assert ledger is not None
    backend, irq = FakeBackend(), FakeIrq()
    dev = VirtioNetDevice(ops, irq, backend, mac=bytes.fromhex("525400123456"),
                          queue_size=16, bus_master=lambda: bme[0])
    for s in specs:
        for spec in parse_list(s):
            dev.add_misbehaviour(spec)
    driver = MockDriver(dev, mem)
    driver.init()
    return NetRig(dev, driver, backend, irq, bme), ledger


def clean(ledger: DmaLedger) -> None:
    """The ledger saw no access outside a mapping and nothing is left mapped but the rings."""
    st = ledger.stats()
    assert st["violations_total"] == 0, st["violations"]


def used_ring(r: NetRig, queue: int, slot: int) -> tuple[int, int]:
    q = r.driver.queues[queue]
    head, length = struct.unpack("<II", q.mem.read(q.used + 4 + 8 * slot, 8))
    return head, length


def rx_one(r: NetRig, payload: int = 60, size: int = 1536) -> None:
    r.rx.add(in_=[size])
    r.rx.kick()
    r.device.process()
    r.backend.rx.append(HDR + bytes(payload))
    r.device.on_backend_readable()


def tx_one(r: NetRig, data: bytes = b"x" * 60) -> None:
    r.tx.add([HDR + data])
    r.tx.kick()
    r.device.process()


def test_a_behaving_device_holds_no_misbehave() -> None:
    r, ledger = rig()
    assert r.device.misbehave is None
    assert all(q.misbehave is None for q in r.device.queues)
    assert "misbehave" not in r.device.stats()
    rx_one(r)
    assert used_ring(r, 0, 0) == (0, 72)
    clean(ledger)


def test_used_len_overflow() -> None:
    r, ledger = rig("used-len-overflow")
    rx_one(r)
    assert r.rx.used_idx() == 1
    assert used_ring(r, 0, 0) == (0, 1536 + 4096)  # more than the buffer's 1536 bytes
    clean(ledger)


def test_used_len_zero_after_n_always() -> None:
    r, ledger = rig("used-len-zero:after=2:always")
    for _ in range(4):
        rx_one(r)
    assert [used_ring(r, 0, s)[1] for s in range(4)] == [72, 72, 0, 0]
    clean(ledger)


def test_used_id_out_of_range_once() -> None:
    r, ledger = rig("used-id-out-of-range:queue=tx0")
    tx_one(r)
    tx_one(r)
    assert used_ring(r, 1, 0) == (16 + 0, 0)  # queue size 16 + head 0
    assert used_ring(r, 1, 1)[0] < 16  # once: the next one is right again
    clean(ledger)


def test_used_id_duplicate() -> None:
    r, ledger = rig("used-id-duplicate:queue=tx0")
    tx_one(r)
    assert r.tx.used_idx() == 2  # one chain, two used elements
    assert used_ring(r, 1, 0) == used_ring(r, 1, 1) == (0, 0)
    clean(ledger)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The misbehaviours' clock, moved by hand: t[0] is now."""
    t = [1000.0]
    monkeypatch.setattr(misbehave_module, "_clock", lambda: t[0])
    return t


def test_used_idx_jump_then_corrected_after_the_hold(clock: list[float]) -> None:
    r, ledger = rig("used-idx-jump:queue=tx0")
    tx_one(r)
    assert r.tx.used_idx() == 1 + 16 + 1  # more than the queue size past the last one
    assert r.device.next_timer() == 1000.0 + PUBLISH_HOLD
    clock[0] += PUBLISH_HOLD - 0.01
    tx_one(r)
    assert r.tx.used_idx() == 1 + 16 + 1  # it stands: the second chain is used, unpublished
    clock[0] += 0.01
    tx_one(r)
    assert r.tx.used_idx() == 3  # published right again (so it went backwards)
    assert r.device.next_timer() is None
    clean(ledger)


def test_used_idx_backwards_then_corrected_after_the_hold(clock: list[float]) -> None:
    r, ledger = rig("used-idx-backwards:queue=tx0:after=2")
    tx_one(r)
    assert r.tx.used_idx() == 1
    tx_one(r)
    assert r.tx.used_idx() == 0  # one less than the last published
    clock[0] += PUBLISH_HOLD / 2
    tx_one(r)
    assert r.tx.used_idx() == 0
    clock[0] += PUBLISH_HOLD
    tx_one(r)
    assert r.tx.used_idx() == 4
    clean(ledger)


@pytest.mark.parametrize("case", ["used-idx-jump", "used-idx-backwards"])
def test_wrong_used_idx_interrupts_and_the_timer_corrects_it(case: str,
                                                             clock: list[float]) -> None:
    """The wrong publish interrupts though the driver asked for none (so it reads the wrong
    value, whatever the timing); with no completion after it, the device's timer publishes
    the right value once the hold is over."""
    r, ledger = rig(f"{case}:queue=tx0")
    r.driver.queues[1].set_avail_flags(1)  # VRING_AVAIL_F_NO_INTERRUPT (no EVENT_IDX)
    r.driver.queues[1].set_used_event(0x8000)  # nowhere near (EVENT_IDX)
    tx_one(r)
    assert r.tx.used_idx() != 1 and r.irq.count(TX_VECTOR) == 1
    r.device.process()
    assert r.tx.used_idx() != 1  # no completion, hold not over: it stands
    clock[0] += PUBLISH_HOLD
    r.driver.queues[1].set_avail_flags(0)  # the driver would take an interrupt now ...
    r.driver.queues[1].set_used_event(0)
    suppressed = r.device.queues[1].stats.interrupts_suppressed
    r.device.process()  # what the server loop does when next_timer() is due
    assert r.tx.used_idx() == 1
    # ... but nothing became used: no interrupt, and none counted as suppressed either
    assert r.irq.count(TX_VECTOR) == 1
    assert r.device.queues[1].stats.interrupts_suppressed == suppressed
    assert r.device.next_timer() is None
    clean(ledger)


def test_wrong_used_idx_hold_ends_at_reset(clock: list[float]) -> None:
    r, ledger = rig("used-idx-jump:queue=tx0")
    tx_one(r)
    assert r.device.next_timer() is not None
    r.device.misbehave.on_status_write(0x0F, 0)  # type: ignore[union-attr]
    assert r.device.next_timer() is None
    clean(ledger)


def rx_header(r: NetRig) -> tuple[int, int, int, int, int, int, int]:
    [(head, n)] = r.rx.get_used()
    return struct.unpack_from("<BBHHHHH", r.rx.written(head, n))


def test_num_buffers_too_large() -> None:
    r, ledger = rig("num-buffers-too-large")
    rx_one(r)
    assert rx_header(r)[6] == 2  # one buffer used, two claimed
    clean(ledger)


def test_gso_size_zero() -> None:
    r, ledger = rig("gso-size-zero")
    rx_one(r)
    _flags, gso_type, _hdr_len, gso_size, *_ = rx_header(r)
    assert (gso_type, gso_size) == (1, 0)
    clean(ledger)


def test_csum_start_beyond_frame() -> None:
    r, ledger = rig("csum-start-beyond-frame")
    rx_one(r)
    flags, _gso, _hl, _gs, start, off, num = rx_header(r)
    assert (flags, start, off, num) == (1, 0xFFF0, 16, 1)
    assert start > 60  # beyond the 60-byte frame
    clean(ledger)


def test_link_flap() -> None:
    r, ledger = rig("link-flap")
    gen = r.driver.read(C.COMMON_CFGGENERATION, 1)
    before = r.irq.count(CONFIG_VECTOR)
    tx_one(r)
    assert r.device.link_up and r.device.link_changes == 2
    assert r.driver.read(C.COMMON_CFGGENERATION, 1) == (gen + 2) & 0xFF
    assert r.irq.count(CONFIG_VECTOR) == before + 2
    clean(ledger)


def test_num_buffers_zero() -> None:
    r, ledger = rig("num-buffers-zero")
    rx_one(r)
    [(head, n)] = r.rx.get_used()
    assert struct.unpack_from("<H", r.rx.written(head, n), 10)[0] == 0
    clean(ledger)


def test_bad_gso_type() -> None:
    r, ledger = rig("bad-gso-type")
    rx_one(r)
    rx_one(r)
    u1, u2 = r.rx.get_used()
    first, second = r.rx.written(*u1), r.rx.written(*u2)
    assert first[1] == 0x7F and second[1] == 0  # once
    assert struct.unpack_from("<H", first, 10)[0] == 1  # num_buffers still right
    clean(ledger)


def test_tx_stall_after_one() -> None:
    r, ledger = rig("tx-stall:after=1")
    tx_one(r, b"a" * 60)
    tx_one(r, b"b" * 60)
    tx_one(r, b"c" * 60)
    assert len(r.backend.tx) == 1 and r.tx.used_idx() == 1
    assert r.device.stats()["misbehave"]["tx_stalled"] is True  # type: ignore[index]
    clean(ledger)


def test_interrupt_storm() -> None:
    r, ledger = rig("interrupt-storm:queue=tx0")
    tx_one(r)
    assert r.irq.count(TX_VECTOR) == 1 + 64  # the real one, then 64 with nothing used
    assert r.tx.used_idx() == 1
    assert r.irq.count(RX_VECTOR) == 0
    clean(ledger)


def test_config_change_no_interrupt() -> None:
    r, ledger = rig("config-change-no-interrupt")
    gen = r.driver.read(C.COMMON_CFGGENERATION, 1)
    before = r.irq.count(CONFIG_VECTOR)
    tx_one(r)
    mac = bytes(r.driver.read(C.DEVICE_OFFSET + i, 1) for i in range(6))
    assert mac == bytes.fromhex("525400123457")
    assert r.driver.read(C.COMMON_CFGGENERATION, 1) == gen
    assert r.irq.count(CONFIG_VECTOR) == before
    clean(ledger)


def test_needs_reset_midtraffic() -> None:
    r, ledger = rig("needs-reset-midtraffic:after=2")
    tx_one(r)
    assert not r.device.status & C.STATUS_NEEDS_RESET
    tx_one(r)  # the second completion: then NEEDS_RESET
    assert r.device.status & C.STATUS_NEEDS_RESET
    assert r.irq.count(CONFIG_VECTOR) >= 1
    tx_one(r)
    assert r.tx.used_idx() == 2  # no more service
    clean(ledger)


def test_tx_used_len_nonzero() -> None:
    r, ledger = rig("tx-used-len-nonzero")
    tx_one(r)
    assert used_ring(r, 1, 0) == (0, 72)  # 12 + 60 bytes the device only read
    clean(ledger)


def test_rx_len_below_header() -> None:
    r, ledger = rig("rx-len-below-header")
    rx_one(r)
    assert used_ring(r, 0, 0) == (0, 5)  # less than the 12-byte vnet header
    clean(ledger)


def test_tx_completion_wrong_id() -> None:
    r, ledger = rig("tx-completion-wrong-id")
    tx_one(r)
    assert used_ring(r, 1, 0) == (1, 0)  # head 0 was completed as head 1
    clean(ledger)


def test_used_out_of_order() -> None:
    r, ledger = rig("used-out-of-order:queue=tx0")
    tx_one(r)
    assert r.tx.used_idx() == 0  # held back
    tx_one(r)
    assert r.tx.used_idx() == 2
    assert [used_ring(r, 1, 0)[0], used_ring(r, 1, 1)[0]] == [1, 0]  # swapped
    clean(ledger)


def three_merged_frames(spec: str) -> tuple[list[int], DmaLedger]:
    """With MRG_RXBUF, 14 RX buffers of 200 bytes and three frames of 2, 2 and 1 buffers
    received under misbehaviour ``spec``: the heads in the used ring, and the ledger."""
    r, ledger = rig(spec)
    for _ in range(14):  # a whole 1514-byte frame left each time, as the device wants to read
        r.rx.add(in_=[200])
    r.rx.kick()
    r.device.process()
    for payload in (300, 300, 100):  # 2 + 2 + 1 buffers of 200 bytes
        r.backend.rx.append(HDR + bytes(payload))
    r.device.on_backend_readable()
    return [h for h, _n in r.rx.get_used()], ledger


def test_used_out_of_order_keeps_a_merged_frame_together() -> None:
    """With MRG_RXBUF a frame spans several buffers, used together (5.1.6.4): the held-back
    frame is released whole after the whole next frame, never split. Fired on the second
    buffer of a frame, the case waits for the next frame's start."""
    heads, ledger = three_merged_frames("used-out-of-order:queue=rx0:after=1")
    assert heads == [0, 1, 4, 2, 3], heads  # frame 2 (heads 2, 3) held until frame 3 ended
    clean(ledger)


def test_used_never_returned() -> None:
    r, ledger = rig("used-never-returned:queue=tx0")
    tx_one(r)
    tx_one(r)
    assert r.tx.used_idx() == 1 and used_ring(r, 1, 0)[0] == 1  # head 0 never comes back
    assert len(r.backend.tx) == 2  # the frame itself was sent
    clean(ledger)


def test_used_never_returned_drops_a_merged_frame_whole() -> None:
    """Fired on the second buffer of a merged frame, the case waits for the next frame's start
    and drops all of its buffers: a frame's buffers are used together (5.1.6.4), and one of
    them missing would make the driver join the next frame's buffer to it (corrupt data, seen
    once in CI), a num_buffers bug rather than the descriptor leak this case is."""
    heads, ledger = three_merged_frames("used-never-returned:queue=rx0:after=1")
    assert heads == [0, 1, 4], heads  # frame 2 (heads 2, 3) never comes back, all of it
    clean(ledger)


def test_data_valid_bad_csum() -> None:
    r, ledger = rig("data-valid-bad-csum:always")
    rx_one(r, payload=60)  # too short to be data: left alone
    rx_one(r, payload=200)
    short, data = (r.rx.written(*u) for u in r.rx.get_used())
    assert short[0] == 0 and data[0] == 2  # DATA_VALID on the long one only
    assert data[-1] == 0xFF and data[12:-1] == bytes(199)  # its last byte flipped
    clean(ledger)


def test_rx_header_reserved_flags() -> None:
    r, ledger = rig("rx-header-reserved-flags")
    rx_one(r)
    assert rx_header(r)[0] == 0xF8
    clean(ledger)


def test_lost_interrupt() -> None:
    r, ledger = rig("lost-interrupt:queue=tx0")
    tx_one(r)
    assert r.tx.used_idx() == 1 and r.irq.count(TX_VECTOR) == 0  # used, not notified
    r.device.process()
    tx_one(r)
    assert r.device.stats()["misbehave"]["fired"] == {"lost-interrupt": 1}  # type: ignore[index]
    clean(ledger)


def test_interrupt_wrong_vector() -> None:
    r, ledger = rig("interrupt-wrong-vector:queue=tx0")
    tx_one(r)
    assert r.irq.count(TX_VECTOR) == 0 and r.irq.count(RX_VECTOR) == 1
    clean(ledger)


def rx_variant(case: str) -> tuple[int, int]:
    """(rx0's, tx0's notifications) after one TX and one RX frame under ``case``: TX left
    alone, rx0's notification acted on."""
    r, ledger = rig(case)
    tx_one(r)
    assert r.irq.count(TX_VECTOR) == 1 and not r.device.stats()["misbehave"]["fired"]  # type: ignore[index]
    rx_one(r)
    assert r.device.stats()["misbehave"]["fired"] == {case: 1}  # type: ignore[index]
    clean(ledger)
    return r.irq.count(RX_VECTOR), r.irq.count(TX_VECTOR)


def test_lost_interrupt_rx() -> None:
    assert rx_variant("lost-interrupt-rx") == (0, 1)


def test_interrupt_wrong_vector_rx() -> None:
    assert rx_variant("interrupt-wrong-vector-rx") == (0, 2)


def test_catalogue_pins_the_interrupt_cases_to_a_queue() -> None:
    """The class of a lost or misrouted notification depends on its queue (RX: a stall for
    good; TX: the driver recovers), so the catalogue never leaves it to timing."""
    assert case_spec("lost-interrupt") == "lost-interrupt:after=100:queue=tx0"
    assert case_spec("interrupt-wrong-vector-rx") == "interrupt-wrong-vector-rx:after=100:queue=rx0"
    for case in CASES:
        parse_list(case_spec(case))


def test_slow_completions() -> None:
    r, ledger = rig("slow-completions:always")
    started = time.monotonic()
    tx_one(r)
    assert time.monotonic() - started >= SLOW_SECONDS
    assert r.irq.count(TX_VECTOR) == 1  # late, not lost
    clean(ledger)


def config_view(r: NetRig) -> tuple[int, int, bytes]:
    mac = bytes(r.driver.read(C.DEVICE_OFFSET + i, 1) for i in range(6))
    return r.driver.read(C.COMMON_CFGGENERATION, 1), r.irq.count(CONFIG_VECTOR), mac


def test_mac_change_after_negotiation() -> None:
    r, ledger = rig("mac-change-after-negotiation")
    gen, irqs, _ = config_view(r)
    tx_one(r)
    assert config_view(r) == ((gen + 1) & 0xFF, irqs + 1, bytes.fromhex("525400123457"))
    clean(ledger)


def test_config_generation_stale() -> None:
    r, ledger = rig("config-generation-stale")
    gen, irqs, _ = config_view(r)
    tx_one(r)
    assert config_view(r) == (gen, irqs + 1, bytes.fromhex("525400123457"))  # no bump
    clean(ledger)


def test_config_interrupt_storm() -> None:
    r, ledger = rig("config-interrupt-storm")
    gen, irqs, mac = config_view(r)
    tx_one(r)
    assert config_view(r) == (gen, irqs + 64, mac)  # nothing changed
    clean(ledger)


def test_needs_reset_no_interrupt() -> None:
    r, ledger = rig("needs-reset-no-interrupt")
    irqs = r.irq.count(CONFIG_VECTOR)
    tx_one(r)
    assert r.device.status & C.STATUS_NEEDS_RESET and r.irq.count(CONFIG_VECTOR) == irqs
    tx_one(r)
    assert r.tx.used_idx() == 1  # no more service
    clean(ledger)


def bare(spec: str) -> tuple[MockDriver, VirtioNetDevice]:
    """A device with ``spec`` on and a driver that has not probed it yet."""
    mem = MockMemory()
    ops, _ = build_mapops("direct", mem.memory, bus_master=lambda: True)
    dev = VirtioNetDevice(ops, FakeIrq(), FakeBackend(), mac=bytes(6), queue_size=16,
                          bus_master=lambda: True)
    dev.add_misbehaviour(Misbehaviour.parse(spec))
    return MockDriver(dev, mem), dev


def test_features_ok_refused() -> None:
    driver, dev = bare("features-ok-refused:always")
    assert not driver.negotiate() and not driver.negotiate()  # every time
    assert not dev.status & C.STATUS_FEATURES_OK


def test_reset_never_completes() -> None:
    driver, dev = bare("reset-never-completes")
    driver.write(C.COMMON_STATUS, 1, C.STATUS_ACKNOWLEDGE)
    driver.write(C.COMMON_STATUS, 1, 0)
    reads = [driver.status() for _ in range(STUCK_RESET_READS + 1)]
    assert all(reads[:-1]) and reads[-1] == 0  # stuck, then (bounded) it reads 0
    assert dev.status == 0
    assert driver.negotiate()  # once: the next reset completes


def test_needs_reset_during_probe() -> None:
    driver, dev = bare("needs-reset-during-probe")
    assert driver.negotiate()  # FEATURES_OK kept ...
    assert dev.status & C.STATUS_NEEDS_RESET  # ... with NEEDS_RESET next to it
    assert driver.status() & C.STATUS_NEEDS_RESET


def test_forbidden_feature_combo() -> None:
    driver, _dev = bare("forbidden-feature-combo")
    feats = driver.device_features()
    assert feats >> C.NET_F_GUEST_TSO4 & 1 and not feats >> C.NET_F_GUEST_CSUM & 1
    assert driver.negotiate()  # consistent: what is offered can be accepted


def test_every_case_has_a_hook_test() -> None:
    tested = {re.sub(r"_(after_n|after_one|once|then)(_.*)?$", "", n[len("test_"):])
              .replace("_", "-") for n in globals() if n.startswith("test_")}
    assert set(CASES) <= tested, set(CASES) - tested


# ---- switches -----------------------------------------------------------------------------


def test_control_command() -> None:
    on: list[Misbehaviour] = []
    table_ = device_commands(stats=dict, stop=lambda: None, misbehave=on.append)
    cmd = table_["misbehave"]
    reply = cmd(None, Request("misbehave", {"cmd": "misbehave",  # type: ignore[arg-type]
                                            "case": "tx-stall", "after": 5}))
    assert reply == {"misbehave": "tx-stall:after=5"} and on == [Misbehaviour("tx-stall", 5)]
    bad: list[tuple[dict[str, object], str]] = [
                      ({}, '"case"'), ({"case": "nope"}, "unknown misbehaviour"),
                      ({"case": "tx-stall", "after": "1"}, '"after" must be an integer'),
                      ({"case": "tx-stall", "after": -1}, "after must be"),
                      ({"case": "tx-stall", "queue": 0}, '"queue" must be a string'),
                      ({"case": "tx-stall", "queue": "rx0"}, "acts on tx0"),
                      ({"case": "tx-stall", "always": 1}, '"always" must be a boolean')]
    for args, why in bad:
        with pytest.raises(CommandError, match=re.escape(why)):
            cmd(None, Request("misbehave", {"cmd": "misbehave", **args}))  # type: ignore[arg-type]
    assert "misbehave" not in device_commands(stats=dict, stop=lambda: None)


def test_server_cli_option(capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _ = parse_args(["--socket", "/tmp/x", "--misbehave", "tx-stall:after=3",
                         "--misbehave", "used-len-zero,bad-gso-type"])
    assert cfg.misbehave == ("tx-stall:after=3", "used-len-zero,bad-gso-type")
    with pytest.raises(SystemExit):
        parse_args(["--socket", "/tmp/x", "--misbehave", "bogus"])
    assert "unknown misbehaviour 'bogus'" in capsys.readouterr().err


# ---- classify -----------------------------------------------------------------------------


def result(*cases: Case, error: str | None = None) -> RunResult:
    r = RunResult(accel="tcg", accel_reason="", map_ops="direct", viommu=False, faults="",
                  qemu_version="", kernel_version="7.3.4", run_dir="/tmp", error=error)
    r.cases = list(cases)
    return r


OK = Case("tcp_guest_to_host", True, "4 MiB")


@pytest.mark.parametrize("cases, error, want", [
    ((OK, Case("kernel_clean", True, "")), None, "graceful"),
    ((Case("tcp_guest_to_host", False, "timed out"),), None, "graceful"),
    ((OK, Case("kernel_warning", False, "1x: WARNING: CPU: 0 PID: 1 at x")), None, "warning"),
    ((Case("host_verified_udp", False, "host saw 90 good, 3 bad of 100"),), None,
     "corruption"),
    ((Case("host_verified_tcp_guest_to_host", False, "host received 5/9 bytes: first "
                                                     "mismatch at 17"),), None, "corruption"),
    ((Case("guest_plan_complete", False, "planned 5, reported 2"),), None, "hang"),
    ((Case("tcp_host_to_guest", False, "mismatch at offset 2481: got 0xb5 expected 0x4a"),),
     None, "corruption"),
    ((Case("udp_mixed", False, "datagram 0: bad echo (483 bytes, expected 483)"),), None,
     "corruption"),
    ((), "the guest did not finish its plan within 60 s", "hang"),
    ((Case("kernel_rcu_stall", False, "rcu: INFO"), Case("kernel_warning", False, "")), None,
     "hang"),
    ((Case("kernel_oops", False, "BUG: unable to handle"),
      Case("guest_plan_complete", False, "")), None, "oops"),
    ((Case("kernel_kasan", False, "BUG: KASAN: slab-out-of-bounds"),), None, "oops"),
])
def test_classify(cases: tuple[Case, ...], error: str | None, want: str) -> None:
    cls, evidence = classify(result(*cases, error=error))
    assert cls == want and cls in CLASSES
    if want != "graceful":
        assert evidence


def test_classify_quotes_console_and_counters() -> None:
    r = result(OK)
    r.guest_net = {"rx_dropped": 3, "tx_errors": 0, "tcp_retrans_segs": 9}
    r.device_stats = {"device": {"misbehave": {"fired": {"used-len-zero": 3}}}}
    cls, ev = classify(r, "boot\n[ 5.1] virtio_net virtio0: input.0:id 300 is not a head!\n")
    assert cls == "graceful"
    assert "device: used-len-zero acted 3x" in ev
    assert "guest: rx_dropped 3" in ev
    assert any("is not a head" in e for e in ev)


def test_compare_and_table() -> None:
    assert compare({"a": "graceful"}, {"a": "graceful"}) == []
    assert compare({"a": "oops", "b": "hang"}, {"a": "graceful"}) == [
        "a: was graceful, now oops", "b: hang (no baseline)"]
    out = table([Outcome("config-change-no-interrupt", "corruption",
                         ["host_verified_udp: host saw 90 good, 3 bad of 100"], 61.5, "/x",
                         "7.3.4", 2.5),
                 Outcome("tx-stall", "hang", [], 30.0, "/y", "7.3.4")])
    assert all(len(line) <= 88 for line in out.splitlines())
    assert out.splitlines()[1].split()[-2:] == ["2.50", "62"]  # recover, run seconds
    assert out.splitlines()[2].split()[-2:] == ["-", "30"]  # no recovery: '-'


def test_recover_seconds_traffic_then_reset() -> None:
    r, _ = rig("tx-completion-wrong-id")
    mb = r.device.misbehave
    assert mb is not None and mb.recover_seconds() is None  # nothing fired yet
    tx_one(r)
    assert mb.fired_at is not None and mb.recover_seconds() is None  # same round: no
    time.sleep(0.01)
    tx_one(r)
    assert mb.recover_seconds() is None  # TX resumed, RX not yet
    rx_one(r)
    rec = mb.recover_seconds()
    assert rec is not None and rec >= 0.01
    assert r.device.stats()["misbehave"]["recovered_by"] == "traffic"  # type: ignore[index]
    r2, _ = rig("tx-stall")
    tx_one(r2)
    time.sleep(0.01)
    r2.driver.reset()  # the driver gives up on the device: cleanly disabled
    rec2 = r2.device.stats()["misbehave"]["recover_s"]  # type: ignore[index]
    assert isinstance(rec2, float) and rec2 >= 0.01
