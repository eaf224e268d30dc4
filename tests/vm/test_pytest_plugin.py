"""The pytest plugin as a user meets it: a test file in a directory outside the project, using
the `testbed`, `guest`, `device` and `qmp` fixtures, run by pytest as a separate process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import need_root

pytestmark = pytest.mark.vm

USER_TESTS = '''
import pytest


def test_my_driver_change(testbed):
    out = testbed.guest.run("ping -c 3 -i 0.2 198.18.0.1")
    assert out.returncode == 0, out.text
    assert testbed.device.stats()["ledger"]["violations_total"] == 0


@pytest.mark.parametrize("testbed", [{"map_ops": "bounce"}], indirect=True)
def test_fixtures_and_parameters(testbed, guest, device, qmp):
    assert guest.run("cat /sys/class/net/eth0/address").text.strip() == "52:54:00:12:34:56"
    pci = qmp("query-pci")
    assert any(d["qdev_id"] == "net0" for bus in pci for d in bus["devices"])
    assert device.stats()["ledger"]["mapops"]["mode"] == "bounce"
'''


def test_a_user_test_file_outside_the_project(tmp_path: Path) -> None:
    need_root()
    (tmp_path / "test_mine.py").write_text(USER_TESTS)
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          "test_mine.py"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "2 passed" in out.stdout
