"""Bad CLI input is a clear error (exit 2), never a traceback."""

from __future__ import annotations

import pytest

from harness.argtypes import size as parse_size
from harness.cli import main


@pytest.mark.parametrize(
    ("text", "value"), [("65536", 65536), ("64K", 65536), ("64M", 64 << 20), ("1GiB", 1 << 30)]
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "argv",
    [
        ["vm-test", "--accel", "hvf"],
        ["vm-test", "--tcp-bytes", "lots"],
        ["vm-test", "--smp", "0"],
        ["vm-test", "--map-ops", "teleport"],
        ["vm-test", "--faults", "mapping-error=2"],
        ["vm-test", "--faults", "gremlins=1"],
        ["vm-test", "--timeout", "-5"],
        ["vm-test", "--boot-timeout", "nan"],
        ["vm-test", "--boot-timeout", "0"],
        ["serve", "--socket", "/tmp/x.sock", "--mac", "52:54:00"],
        ["serve", "--socket", "/tmp/x.sock", "--queue-size", "100"],
        ["vm-test", "--misbehave", "no-such-case"],
        ["run", "--misbehave", "used-len-zero:after=x"],
        ["bogus"],
    ],
)
def test_bad_input_exits_2_with_message(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage:" in err and "Traceback" not in err


def test_run_passes_misbehave_to_the_testbed(monkeypatch: pytest.MonkeyPatch) -> None:
    """`harness run --misbehave` reaches the TestbedConfig, normalised (as vm-test's does)."""
    import harness.session

    seen: list[object] = []

    def fake_session(cfg: object, *args: object) -> int:
        seen.append(cfg)
        return 0

    monkeypatch.setattr(harness.session, "run_session", fake_session)
    assert main(["run", "--misbehave", "used-len-zero", "--misbehave", "tx-stall:after=3"]) == 0
    (cfg,) = seen
    assert cfg.misbehave == ("used-len-zero", "tx-stall:after=3")  # type: ignore[attr-defined]
