"""Misbehaviours: the spec parser, the registry and catalogue, the control command and switches,
classify() on constructed runs and recovery timing. Each hook breaking exactly its one rule is
tests/unit/test_misbehave_hooks.py, on this module's rig (a device whose map ops carry the
DMA ledger)."""

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
from harness.virtio.misbehave import (
    CASES,
    POINTS,
    QUEUES,
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


def test_catalogue_pins_the_interrupt_cases_to_a_queue() -> None:
    """The class of a lost or misrouted notification depends on its queue (RX: a stall for
    good; TX: the driver recovers), so the catalogue never leaves it to timing."""
    assert case_spec("lost-interrupt") == "lost-interrupt:after=100:queue=tx0"
    assert case_spec("interrupt-wrong-vector-rx") == "interrupt-wrong-vector-rx:after=9:queue=rx0"
    for case in CASES:
        parse_list(case_spec(case))


# ---- a device with misbehaviours on, its map ops carrying the ledger -----------------------


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
