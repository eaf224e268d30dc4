"""Options that parse but cannot work (a kernel that is not there, a missing --initrd-add) are
one line on stderr and exit 2, before anything starts: no traceback, no QEMU, no probe."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.cli import main


@pytest.mark.parametrize(("args", "message"), [
    (["--kernel", "/nonexistent/bzImage"], "/nonexistent/bzImage does not exist"),
    (["--initrd-add", "/nonexistent-dir"], "not a directory"),
])
@pytest.mark.parametrize("command", ["vm-test", "run"])
def test_refused_before_anything_starts(command: str, args: list[str], message: str,
                                        tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    extra = ["--out", str(tmp_path)] if command == "vm-test" else []
    assert main([command, *args, *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, lines
    # Without a dependency cache the environment error comes first, which is fine too.
    assert message in lines[0] or "make deps" in lines[0]


def test_testbed_refuses_an_unknown_device_kind(tmp_path: Path) -> None:
    from harness.testbed import Testbed, TestbedConfig, TestbedError

    with pytest.raises(TestbedError, match="device must be one of ours, builtin"):
        Testbed(TestbedConfig(device="e1000"), tmp_path)
