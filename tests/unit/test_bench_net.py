"""harness bench net: medians, ratios that always favour ours above 1, the 80-column table."""

from __future__ import annotations

import json

import pytest

from harness.bench import net
from harness.bench.net import Round, median, ratio, summarize, table


def test_median_and_ratio_direction() -> None:
    assert median([]) is None
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0, 3.0, 10.0]) == 2.5
    assert ratio(200.0, 100.0, True) == 2.0      # throughput: ours/builtin
    assert ratio(2.0, 4.0, False) == 2.0         # RTT/CPU: builtin/ours, ours twice as fast
    assert ratio(None, 1.0, True) is None and ratio(1.0, None, False) is None
    assert ratio(1.0, 0.0, True) is None and ratio(0.0, 1.0, False) is None


def _rounds() -> list[Round]:
    return [
        Round("ours", 1, values={"tcp_guest_to_host": 100.0, "ping_rtt": 4.0,
                                 "server_cpu": 9.0}),
        Round("builtin", 1, values={"tcp_guest_to_host": 300.0, "ping_rtt": 2.0}),
        Round("ours", 2, values={"tcp_guest_to_host": 120.0, "ping_rtt": 6.0,
                                 "server_cpu": 11.0}),
        Round("builtin", 2, values={"tcp_guest_to_host": 200.0, "ping_rtt": 3.0}),
        Round("ours", 3, error="tcp_guest_to_host: timed out"),
    ]


def test_summarize_medians_per_side_and_workload() -> None:
    rows = {r["workload"]: r for r in summarize(_rounds())}
    assert [w.name for w in net.WORKLOADS] == list(rows)
    g2h = rows["tcp_guest_to_host"]
    assert (g2h["ours"], g2h["builtin"], g2h["better"]) == (110.0, 250.0, "higher")
    assert g2h["ratio"] == pytest.approx(110 / 250)
    assert g2h["samples"] == {"ours": [100.0, 120.0], "builtin": [300.0, 200.0]}
    rtt = rows["ping_rtt"]
    assert (rtt["ours"], rtt["builtin"], rtt["better"]) == (5.0, 2.5, "lower")
    assert rtt["ratio"] == pytest.approx(0.5)
    srv = rows["server_cpu"]
    assert (srv["ours"], srv["builtin"], srv["ratio"]) == (10.0, None, None)
    assert rows["tcp_host_to_guest"]["ours"] is None
    json.dumps(list(rows.values()))  # the --json output is plain JSON


def test_table_fits_80_columns_and_says_which_way() -> None:
    text = table(summarize(_rounds()), 2)
    lines = text.splitlines()
    assert all(len(line) <= 80 for line in lines)
    assert lines[0].split() == ["workload", "unit", "ours", "builtin", "ratio", "better"]
    g2h = next(line for line in lines if line.startswith("TCP guest->host"))
    assert g2h.split()[-4:] == ["110.0", "250.0", "0.44x", "higher"]
    rtt = next(line for line in lines if line.startswith("ping RTT"))
    assert rtt.split()[-4:] == ["5", "2.5", "0.50x", "lower"]
    srv = next(line for line in lines if line.startswith("device server"))
    assert srv.split()[-4:] == ["10", "-", "-", "lower"]
    assert "ratio > 1 favours ours" in text and "medians of 2 round(s)" in text


def test_pci_device_is_found_by_qdev_id() -> None:
    reply = [{"bus": 0, "devices": [
        {"qdev_id": "", "id": {"vendor": 0x8086, "device": 0x29c0}},
        {"qdev_id": "net0", "class_info": {"desc": "Ethernet controller"},
         "id": {"vendor": 0x1AF4, "device": 0x1041, "subsystem": 0x1100}}]}]
    dev = net._pci_device(reply)
    assert dev["device"] == "0x1041" and dev["subsystem"] == "0x1100"
    assert net._pci_device([]) == {}


def test_cpu_ticks_of_this_process_and_of_none() -> None:
    import os

    ticks = net._cpu_ticks(os.getpid())
    assert ticks is not None and ticks >= 0
    assert net._cpu_ticks(None) is None


def test_bad_options_are_argparse_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        net.main(["--rounds", "0"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        net.main(["--bytes", "lots"])
    assert "not a size" in capsys.readouterr().err
