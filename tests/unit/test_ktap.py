"""The KTAP parser copes with real console output: kernel noise, CRLF, skips, partial logs."""

from __future__ import annotations

from harness.vm import ktap

CONSOLE = (
    "SeaBIOS (version 1.16)\r\n"
    "[    0.000000] Linux version 7.3.4+deb13-amd64\r\n"
    "KTAP version 1\r\n"
    "# harness: kernel 7.3.4 plan=link_up,ping_host,tcp_guest_to_host seed=1\r\n"
    "1..4\r\n"
    "# metric: link_up iface=eth0 mac=52:54:00:12:34:56 mtu=1500 carrier_wait_ms=0\r\n"
    "[    3.141592] virtio_net virtio0 eth0: renamed\r\n"
    "ok 1 link_up\r\n"
    "# metric: ping_host transmitted=5 received=5 rtt_min_ms=0.512 rtt_avg_ms=1.5 rtt_max_ms=4\r\n"
    "ok 2 ping_host\r\n"
    "# metric: tcp_guest_to_host bytes=1000 seconds=0.5 mbps=0.0 connect_attempts=3\r\n"
    "not ok 3 tcp_guest_to_host # peer verdict: BAD 17 content\r\n"
    "ok 4 udp_mixed # SKIP link down\r\n"
    "# harness: done\r\n"
    "[    9.000000] reboot: Power down\r\n"
)


def test_parses_results_metrics_and_done() -> None:
    r = ktap.parse(CONSOLE)
    assert (r.version, r.plan, r.done, r.missing) == (1, 4, True, [])
    assert r.complete and not r.ok
    names = r.by_name()
    assert list(names) == ["link_up", "ping_host", "tcp_guest_to_host", "udp_mixed"]
    assert names["link_up"].status is ktap.Status.PASS
    assert names["link_up"].metrics["mac"] == "52:54:00:12:34:56"
    assert names["ping_host"].metrics == {
        "transmitted": 5, "received": 5, "rtt_min_ms": 0.512, "rtt_avg_ms": 1.5, "rtt_max_ms": 4,
    }  # fmt: skip
    failed = names["tcp_guest_to_host"]
    assert failed.status is ktap.Status.FAIL and not failed.passed
    assert failed.reason == "peer verdict: BAD 17 content"
    assert failed.metrics["connect_attempts"] == 3
    skipped = names["udp_mixed"]
    assert skipped.status is ktap.Status.SKIP and skipped.passed and skipped.reason == "link down"
    assert "harness: kernel 7.3.4 plan=link_up,ping_host,tcp_guest_to_host seed=1" in r.diagnostics


def test_all_ok() -> None:
    text = "KTAP version 1\n1..2\nok 1 a\nok 2 b # SKIP not here\n# harness: done\n"
    r = ktap.parse(text)
    assert r.ok and [t.status for t in r.tests] == [ktap.Status.PASS, ktap.Status.SKIP]


def test_partial_log_is_incomplete() -> None:
    r = ktap.parse("KTAP version 1\n1..3\nok 1 link_up\n# metric: ping_host transmitted=5\n")
    assert r.missing == [2, 3] and not r.complete and not r.ok and not r.done
    assert r.metrics == {"ping_host": {"transmitted": 5}}


def test_nothing_before_header_counts() -> None:
    # A boot loader or kernel line that happens to look like a result precedes the header.
    r = ktap.parse("ok 9 bogus\n[ 1.0] x: KTAP version 1\n1..1\nok 1 real\n# harness: done\n")
    assert [t.name for t in r.tests] == ["real"] and r.ok


def test_kernel_timestamp_prefix_and_noise_tolerated() -> None:
    text = (
        "KTAP version 1\n1..1\n"
        "[    5.1] virtio_net: some warning\n"
        "random garbage line\n"
        "[    5.2] ok 1 link_up\n"
        "# harness: done\n"
    )
    r = ktap.parse(text)
    assert r.ok and r.tests[0].name == "link_up"


def test_subtests_and_todo_and_bailout() -> None:
    text = (
        "KTAP version 1\n1..2\n"
        "    KTAP version 1\n    1..1\n    ok 1 inner\n"
        "ok 1 outer\n"
        "not ok 2 flaky # TODO known bug\n"
        "Bail out! guest panicked\n"
    )
    r = ktap.parse(text)
    assert [t.name for t in r.tests] == ["outer", "flaky"]
    assert r.tests[1].status is ktap.Status.TODO and r.tests[1].passed
    assert r.bail_out == "guest panicked" and not r.ok


def test_metric_values() -> None:
    assert ktap.parse_metrics('a=1 b=2.5 c=x d="two words" e=') == {
        "a": 1, "b": 2.5, "c": "x", "d": "two words", "e": "",
    }  # fmt: skip
