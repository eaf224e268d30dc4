"""The per-run feature switches (harness.virtio.features) and where they surface: the server's
--features option, the TAP's TUNSETOFFLOAD bits."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.net.tap import TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, offload_for
from harness.server.cli import parse_args
from harness.virtio import constants as C
from harness.virtio.features import DEFAULTS, NetFeatures, parse, resolve
from harness.virtio.net import DEFAULT_FEATURES, OFFLOAD_FEATURES


def test_defaults_are_what_users_run() -> None:
    assert DEFAULTS.bits == (DEFAULT_FEATURES | OFFLOAD_FEATURES | (1 << C.F_INDIRECT_DESC)
                             | (1 << C.F_RING_RESET))
    assert DEFAULTS.mtu is None and DEFAULTS.offloads and DEFAULTS.spec() == ""


def test_switches_apply_in_order_and_round_trip() -> None:
    f = parse("mrg_rxbuf=off,event_idx=off,indirect=off,MTU=9000,event_idx=on")
    assert not f.bits >> C.NET_F_MRG_RXBUF & 1 and not f.bits >> C.F_INDIRECT_DESC & 1
    assert f.bits >> C.F_EVENT_IDX & 1 and f.bits >> C.NET_F_MTU & 1 and f.mtu == 9000
    assert parse(f.spec()) == f
    assert parse("mtu=9000,mtu=off").mtu is None


def test_offloads_alias_and_resolve() -> None:
    off = parse("offloads=off")
    assert not off.offloads and off.bits & OFFLOAD_FEATURES == 0
    assert resolve("", offloads=False) == off
    assert resolve("csum=on", offloads=False).bits & OFFLOAD_FEATURES == 1 << C.NET_F_CSUM
    assert resolve("", offloads=True) == resolve() == DEFAULTS


@pytest.mark.parametrize(("spec", "message"), [
    ("bogus=on", "unknown feature 'bogus'"),
    ("csum=maybe", "csum=maybe: the value must be on or off"),
    ("csum", "has no value"),
    ("mtu=67", "mtu=67: not a number from 68 to 65535"),
    ("mtu=65536", "not a number"),
    ("mtu=9k", "not a number"),
    ("csum=off", "host_tso4=on needs csum=on (virtio 1.3 5.1.3.1)"),
    ("guest_csum=off,guest_tso4=off", "guest_tso6=on needs guest_csum=on"),
])  # fmt: skip
def test_bad_switches_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse(spec)
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_dependencies_hold_for_every_offload_subset() -> None:
    # Turning a needed feature off with its dependants is fine; the dependants alone are not.
    assert parse("csum=off,host_tso4=off,host_tso6=off").bits >> C.NET_F_CSUM & 1 == 0
    assert parse("guest_tso4=off,guest_tso6=off,guest_csum=off").offloads


def test_server_cli_features(capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _ = parse_args(["--socket", "/tmp/s", "--features", "mtu=9000,indirect=off"])
    assert cfg.features == "mtu=9000,indirect=off"
    with pytest.raises(SystemExit) as exc:
        parse_args(["--socket", str(Path("/tmp/s")), "--features", "host_tso6=on,csum=off"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith("--features: host_tso4=on needs csum=on (virtio 1.3 5.1.3.1)")


def test_tap_offload_bits_follow_the_negotiated_guest_features() -> None:
    g = {n: 1 << b for n, b in (("csum", C.NET_F_GUEST_CSUM), ("tso4", C.NET_F_GUEST_TSO4),
                                ("tso6", C.NET_F_GUEST_TSO6))}
    assert offload_for(0) == 0
    assert offload_for(OFFLOAD_FEATURES & ~g["csum"]) == 0  # TSO without csum: nothing
    assert offload_for(g["csum"]) == TUN_F_CSUM
    assert offload_for(g["csum"] | g["tso4"]) == TUN_F_CSUM | TUN_F_TSO4
    assert offload_for(NetFeatures().bits) == TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    # Host-side offloads (CSUM, HOST_TSO*) are the TX direction: they never open the RX side.
    assert offload_for((1 << C.NET_F_CSUM) | (1 << C.NET_F_HOST_TSO4)) == 0


@pytest.mark.parametrize("argv", [
    ["vm-test", "--features", "bogus=on"],
    ["run", "--features", "mtu=9"],
    ["vm-test", "--features", "guest_tso4=on,guest_csum=off"],
    ["serve", "--socket", "/tmp/x.sock", "--features", "indirect=maybe"],
])  # fmt: skip
def test_harness_cli_features_errors_are_one_line(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from harness.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].split("error: ")[-1].startswith("argument --features")
