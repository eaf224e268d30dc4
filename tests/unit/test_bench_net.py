"""harness bench net: medians, ratios that always favour ours above 1, CPU per unit, the
parsers of the guest's output, the tables, the host perf peer and DMA latency percentiles."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from harness.bench import net, netrun, profile
from harness.bench.net import Round, median, ratio, summarize, table
from harness.net.perfpeer import UdpPerf
from harness.vfu.latency import LatencyRecorder, percentile


def test_median_and_ratio_direction() -> None:
    assert median([]) is None
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0, 3.0, 10.0]) == 2.5
    assert ratio(200.0, 100.0, True) == 2.0      # throughput: ours/builtin
    assert ratio(2.0, 4.0, False) == 2.0         # RTT: builtin/ours, ours twice as fast
    assert ratio(None, 1.0, True) is None and ratio(1.0, None, False) is None
    assert ratio(1.0, 0.0, True) is None and ratio(0.0, 1.0, False) is None


def _rounds() -> list[Round]:
    lat = {"map_reply": {"count": 10, "p50_us": 100.0, "p99_us": 900.0}}
    return [
        Round("ours", 1, values={"tcp_guest_to_host": 100.0, "ping_rtt": 4.0},
              cpu={"tcp_guest_to_host": {"server": 9.0, "qemu": 20.0}}, dma_latency=lat),
        Round("builtin", 1, values={"tcp_guest_to_host": 300.0, "ping_rtt": 2.0},
              cpu={"tcp_guest_to_host": {"qemu": 30.0}}),
        Round("ours-noledger", 1, values={"tcp_guest_to_host": 150.0}),
        Round("ours", 2, values={"tcp_guest_to_host": 120.0, "ping_rtt": 6.0},
              cpu={"tcp_guest_to_host": {"server": 11.0, "qemu": 22.0}}, dma_latency=lat),
        Round("builtin", 2, values={"tcp_guest_to_host": 200.0, "ping_rtt": 3.0}),
        Round("ours", 3, error="tcp_guest_to_host: timed out"),
        Round("ours", 1, config="viommu", values={"tcp_guest_to_host": 10.0}),
    ]


def test_summarize_medians_per_config_side_and_workload() -> None:
    rows = {(r["config"], r["workload"]): r for r in summarize(_rounds())}
    plain = [w for c, w in rows if c == "plain"]
    assert plain == [w.name for w in net.WORKLOADS] + ["dma_map_reply"]
    g2h = rows["plain", "tcp_guest_to_host"]
    assert (g2h["ours"], g2h["builtin"], g2h["better"]) == (110.0, 250.0, "higher")
    assert g2h["ratio"] == pytest.approx(110 / 250)
    assert g2h["ours_ledger_off"] == 150.0 and g2h["ledger_cost"] == pytest.approx(150 / 110)
    assert g2h["cpu"] == {"ours_server": 10.0, "ours_qemu": 21.0, "builtin_qemu": 30.0}
    assert g2h["samples"]["ours"] == [100.0, 120.0]
    rtt = rows["plain", "ping_rtt"]
    assert (rtt["ours"], rtt["builtin"], rtt["better"]) == (5.0, 2.5, "lower")
    assert rtt["ratio"] == pytest.approx(0.5) and rtt["cpu"] == {}
    dma = rows["plain", "dma_map_reply"]
    assert (dma["ours"], dma["p99"], dma["count"]) == (100.0, 900.0, 10)
    assert rows["viommu", "tcp_guest_to_host"]["ours"] == 10.0
    assert rows["viommu", "tcp_guest_to_host"]["builtin"] is None
    assert ("viommu", "dma_map_reply") not in rows
    json.dumps(list(rows.values()))  # the --json output is plain JSON


def test_table_fits_80_columns_and_says_which_way() -> None:
    text = table(summarize(_rounds()), 2)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert lines[0] == "[plain] offloads off, vIOMMU off"
    assert lines[1].split() == ["workload", "unit", "ours", "builtin", "ratio", "won",
                                "no-ledger", "server", "CPU"]
    g2h = next(line for line in lines if line.startswith("TCP guest->host"))
    assert g2h.split()[-7:] == ["110.0", "250.0", "0.44x", "0/2", "150.0", "10", "ms/MiB"]
    rtt = next(line for line in lines if line.startswith("ping RTT"))
    assert rtt.split()[-6:] == ["5", "2.5", "0.50x", "0/2", "-", "-"]
    udp = next(line for line in lines if line.startswith("UDP 64B g->h"))
    assert udp.split()[-6:] == ["-", "-", "-", "-", "-", "-"]  # no pairs: no count
    assert any(line.startswith("dma_map_reply") and "p99 900.0 us" in line for line in lines)
    assert "[viommu] offloads off, vIOMMU on" in lines
    assert "ratio > 1 favours ours" in text and "medians of 2 round(s)" in text


def test_guest_output_parsers() -> None:
    m = netrun.parse_metrics("sent=10 received=9 pps=1234 tx_pps=nan? seconds=1.5\n")
    assert m == {"sent": 10.0, "received": 9.0, "pps": 1234.0, "seconds": 1.5}
    ping = ("20 packets transmitted, 20 packets received, 0% packet loss\n"
            "round-trip min/avg/max = 0.512/1.234/4.000 ms\n")
    assert netrun.parse_ping(ping) == 1.234
    assert netrun.parse_ping("ping: sendto: Network is unreachable\n") is None


def test_cpu_per_unit() -> None:
    # 500 ms of CPU over 16 MiB = 31.25 ms/MiB; over 10,000 packets = 50 us/packet.
    assert netrun.per_unit(500_000_000, 16, 1.0) == pytest.approx(31.25)
    assert netrun.per_unit(500_000_000, 10_000, 1000.0) == pytest.approx(50.0)
    assert netrun.per_unit(500_000_000, 0, 1.0) is None


def test_cpu_ns_is_finer_than_a_clock_tick() -> None:
    """A ping costs the server a fraction of a 10 ms tick: the reading must see 2 ms of a
    child's CPU as about 2 ms (ticks would say 0 or 10), and count its threads."""
    code = ("import sys, threading, time\n"
            "def spin():\n"
            "    end = time.thread_time() + 0.002\n"
            "    while time.thread_time() < end: pass\n"
            "print(flush=True); sys.stdin.readline()\n"
            "t = threading.Thread(target=spin); t.start(); t.join()\n"
            "print(flush=True); sys.stdin.readline()\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE)
    try:
        assert child.stdout is not None and child.stdin is not None
        child.stdout.readline()  # started, now waiting
        idle = netrun.cpu_ns(child.pid)
        child.stdin.write(b"go\n")
        child.stdin.flush()
        child.stdout.readline()  # a thread spun 2 ms and ended
        done = netrun.cpu_ns(child.pid)
        assert idle is not None and done is not None
        assert 1_500_000 <= done - idle < 9_000_000
        child.stdin.close()
        child.wait(10)
        assert netrun.cpu_ns(child.pid) is None  # reaped: gone
    finally:
        child.kill()
        child.wait()
    assert netrun.cpu_ns(None) is None
    assert netrun.cpu_ns(2**22 + 12345) is None  # no such process


def test_workload_commands_use_the_options() -> None:
    o = netrun.Options(nbytes=4 << 20, seconds=1.5, rr_size=64, rate=1000)
    cmds = {name: c.build(o) for name, c in netrun.COMMANDS.items()}
    assert cmds["tcp_guest_to_host"].startswith("hnet tcp-send --host 198.18.0.1 --port 5001")
    assert "--bytes 4194304" in cmds["tcp_host_to_guest"]
    assert "--size 64 --seconds 1.5" in cmds["tcp_rr"]
    assert "--rate 1000" in cmds["udp_pps_host_to_guest"]
    assert list(cmds) == [w.name for w in net.WORKLOADS]


def test_pci_device_is_found_by_qdev_id() -> None:
    reply = [{"bus": 0, "devices": [
        {"qdev_id": "", "id": {"vendor": 0x8086, "device": 0x29c0}},
        {"qdev_id": "net0", "class_info": {"desc": "Ethernet controller"},
         "id": {"vendor": 0x1AF4, "device": 0x1041, "subsystem": 0x1100}}]}]
    dev = netrun._pci_device(reply)
    assert dev["device"] == "0x1041" and dev["subsystem"] == "0x1100"
    assert netrun._pci_device([]) == {}


def test_bad_options_are_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        net.main(["--rounds", "0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        net.main(["--bytes", "lots"])
    assert "not a size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        net.main(["--config", "plain,fast"])
    assert "unknown config fast" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        net.main(["--seconds", "0"])


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0 and percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0 and percentile([7.0], 99) == 7.0
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile(values, 0)


def test_latency_recorder_summary_in_microseconds_and_bounded() -> None:
    rec = LatencyRecorder(capacity=100)
    assert rec.summary() == {"count": 0, "p50_us": None, "p99_us": None, "max_us": None,
                             "mean_us": None}
    for i in range(1, 201):  # the ring keeps the newest 100: 101..200 us
        rec.add(i * 1e-6)
    s = rec.summary()
    assert s["count"] == 200 and s["p50_us"] == 150.0 and s["p99_us"] == 199.0
    assert s["max_us"] == 200.0 and s["mean_us"] == pytest.approx(100.5)


def test_udp_perf_counts_tagged_datagrams_and_answers_queries() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(2)
    clock = iter([1000, 1500, 2500, 9999])
    perf = UdpPerf(server, clock=lambda: next(clock))
    tag = (42).to_bytes(8, "little")
    for seq in range(3):
        perf.on_datagram(b"D" + tag + seq.to_bytes(8, "little") + bytes(47), None)
    perf.on_datagram(b"D" + (7).to_bytes(8, "little") + bytes(55), None)  # another run
    perf.on_datagram(b"short", None)
    perf.on_datagram(b"Q" + tag, client.getsockname())
    reply = client.recv(64)
    assert reply[:1] == b"R" and reply[1:9] == tag
    assert [int.from_bytes(reply[i:i + 8], "little") for i in (9, 17, 25)] == [3, 1000, 2500]
    perf.on_datagram(b"Q" + (5).to_bytes(8, "little"), client.getsockname())  # unknown run
    assert client.recv(64)[9:17] == bytes(8)
    server.close()
    client.close()


def test_udp_perf_flood_is_paced_and_ends_with_a_marker() -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(2)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    perf = UdpPerf(tx)
    sent = perf.flood(9, rx.getsockname(), 64, 0.1, 1000)
    assert 90 <= sent <= 110  # 0.1 s at 1000/s
    kinds = []
    while True:
        try:
            data = rx.recv(2048)
        except TimeoutError:
            break
        kinds.append(data[:1])
        if data[:1] == b"E":
            assert int.from_bytes(data[9:17], "little") == sent
            break
    assert kinds.count(b"D") == sent and kinds[-1] == b"E"
    rx.close()
    tx.close()


def test_profile_self_and_inclusive_time_from_collapsed_stacks(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]
                                                               ) -> None:
    stacks = [
        "process 12:\"python -m harness.server\";serve (harness/server/loop.py:170);"
        "turn (harness/server/loop.py:250);writev (harness/net/tap.py:90) 6",
        "process 12:\"python -m harness.server\";serve (harness/server/loop.py:170);"
        "turn (harness/server/loop.py:251) 2",
        "serve (harness/server/loop.py:171);select (/usr/lib/python3.11/selectors.py:468) 2",
        "garbage line",
    ]
    prof = profile.parse(stacks)
    assert prof.total == 10
    assert prof.top("self", 2) == [("tap.py:writev", 60.0), ("loop.py:turn", 20.0)]
    assert dict(prof.top("inclusive", 5))["loop.py:turn"] == 80.0
    assert dict(prof.top("inclusive", 5))["loop.py:serve"] == 100.0
    f = tmp_path / "p.txt"
    f.write_text("\n".join(stacks) + "\n")
    assert profile.main([str(f), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("10 samples in 1 file(s)") and "60.0%  tap.py:writev" in out
    assert profile.main([str(tmp_path / "missing.txt")]) == 2


def test_ab_refuses_a_knob_the_server_does_not_read(capsys: pytest.CaptureFixture[str]) -> None:
    # A removed or mistyped knob would boot the default twice and call it an A/B.
    with pytest.raises(SystemExit) as exc:
        net.main(["--ab", "HARNESS_WALK=classic"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "HARNESS_WALK: not a device server knob" in err and "HARNESS_TX_HOLDOFF_US" in err
    assert net._env_list("HARNESS_TX_HOLDOFF_US=200, HARNESS_RX_POOL=call") == (
        ("HARNESS_TX_HOLDOFF_US", "200"), ("HARNESS_RX_POOL", "call"))


@pytest.mark.parametrize("pair, expected", [
    ("HARNESS_RX_POOL=off", "expected keep or call"),
    ("HARNESS_LOOP_POLL_US=abc", "expected microseconds 0..10000"),
    ("HARNESS_LOOP_POLL_US=10001", "expected microseconds 0..10000"),
    ("HARNESS_LEDGER=of", "expected on or off"),
    ("HARNESS_FAST_TX=no", "expected on or off"),
])
def test_ab_refuses_a_value_the_server_would_refuse(
        pair: str, expected: str, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A value the server refuses would end every B boot in an error: refused before booting."""
    import os

    def not_reached(*args: object) -> None:
        raise AssertionError("booted with a value the server refuses")

    monkeypatch.setattr(net, "run", not_reached)  # a mutant fails here instead of booting
    before = dict(os.environ)
    with pytest.raises(SystemExit) as exc:
        net.main(["--ab", pair])
    assert exc.value.code == 2
    assert expected in capsys.readouterr().err
    assert dict(os.environ) == before  # the check leaves this process's environment alone


def test_server_knobs_name_every_env_the_server_reads() -> None:
    # Every HARNESS_* name a device-server module reads must be flippable by --ab.
    import re
    root = Path(net.__file__).resolve().parents[1]
    found: set[str] = set()
    for sub in ("server", "virtio", "dma", "vfu"):
        for path in (root / sub).glob("*.py"):
            if path.name != "build.py":  # C source for the cffi module, not the environment
                found |= set(re.findall(r'"(HARNESS_[A-Z_]+)"', path.read_text()))
    from harness.server import switches
    assert found and found <= set(switches.READERS), found - set(switches.READERS)


def _paired(other: str, pairs: list[tuple[float, float, float, float]],
            unpaired: float) -> list[Round]:
    """Rounds 1.. of ours and ``other``, (ours tcp_rr, ours ping_rtt, other's tcp_rr, other's
    ping_rtt) each; then one more round of ``other`` alone (``unpaired`` RR): not a pair."""
    rs: list[Round] = []
    for i, (rr, ping, orr, oping) in enumerate(pairs, start=1):
        rs += [Round("ours", i, values={"tcp_rr": rr, "ping_rtt": ping}),
               Round(other, i, values={"tcp_rr": orr, "ping_rtt": oping})]
    return [*rs, Round(other, len(pairs) + 1, values={"tcp_rr": unpaired})]


def test_the_table_counts_the_rounds_ours_beat_the_builtin_device() -> None:
    """A ratio of medians inside the noise reads the same as a steady lead: the table says
    in how many rounds ours beat the built-in device booted in the same round."""
    rs = _paired("builtin", [(100.0, 2.0, 90.0, 2.5), (100.0, 2.0, 150.0, 1.0),
                             (100.0, 2.0, 99.0, 2.1)], unpaired=1.0)
    rows = {r["workload"]: r for r in summarize(rs)}
    assert rows["tcp_rr"]["wins"] == [2, 3]
    assert rows["ping_rtt"]["wins"] == [2, 3]  # lower is better
    lines = table(summarize(rs), 4).splitlines()
    rr = next(line for line in lines if line.startswith("TCP RR"))
    assert rr.split()[-4:] == ["1.06x", "2/3", "-", "-"]  # median 100 against 94.5
    assert all(len(line) <= 80 for line in lines)
    assert "won: rounds in which ours beat the" in "\n".join(lines)


def test_ab_counts_the_rounds_b_won_pair_by_pair() -> None:
    """B/A of medians can hide that B won every round (or one): the table says how many."""
    rs = _paired("ours-ab", [(100.0, 2.0, 110.0, 2.5), (200.0, 3.0, 190.0, 1.0),
                             (100.0, 2.0, 101.0, 1.5)], unpaired=999.0)
    rows = {r["workload"]: r for r in summarize(rs)}
    assert rows["tcp_rr"]["ab_wins"] == [2, 3]
    assert rows["ping_rtt"]["ab_wins"] == [2, 3]  # lower is better
    text = table(summarize(rs), 4)
    assert any(line.startswith("TCP RR") and line.endswith("2/3") for line in text.splitlines())
    assert "B better: rounds in which" in text
    assert all(len(line) <= 80 for line in text.splitlines())


def test_every_side_boots_in_every_position_over_a_cycle_of_rounds() -> None:
    """A fixed order would let "always boots right after the built-in one" pass for an
    effect of the knob under test."""
    sides = ["ours", "builtin", "ours-noledger", "ours-ab"]
    orders = [net.side_order(sides, i) for i in range(1, 5)]
    assert orders[0] == sides and orders[1] == ["builtin", "ours-noledger", "ours-ab", "ours"]
    for pos in range(4):
        assert sorted(o[pos] for o in orders) == sorted(sides)
    assert net.side_order(sides, 5) == sides and net.side_order([], 3) == []


def test_append_reaches_every_sides_guest_kernel(monkeypatch: pytest.MonkeyPatch,
                                                 tmp_path: Path) -> None:
    seen: list[netrun.Options] = []

    def fake_run(opts: netrun.Options, _progress: object) -> list[Round]:
        seen.append(opts)
        return []
    monkeypatch.setattr(net, "run", fake_run)
    assert net.main(["--config", "viommu", "--append", "iommu.strict=0  foo=1"]) == 0
    assert seen[0].append == ("iommu.strict=0", "foo=1")

    class Booted(BaseException):
        pass
    configs = []

    def fake_testbed(cfg: object, *_a: object, **_k: object) -> None:
        configs.append(cfg)
        raise Booted
    monkeypatch.setattr("harness.testbed.Testbed", fake_testbed)
    for side in ("ours", "builtin"):
        with pytest.raises(Booted):
            netrun.run_round(side, 0, "viommu", seen[0], tmp_path, None, None)  # type: ignore[arg-type]
    assert [c.append for c in configs] == [("iommu.strict=0", "foo=1")] * 2  # type: ignore[attr-defined]
