"""The pytest plugin's command-line options reach the TestbedConfig (no VM: only the config
fixture runs), and a bad one is a usage error, not a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

USER_TEST = '''
def test_config(testbed_config):
    assert testbed_config.misbehave == ("used-len-zero", "tx-stall:after=3"), testbed_config
    assert testbed_config.features == "mtu=9000"
'''


def _pytest(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_user.py").write_text(USER_TEST)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *args, "test_user.py"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)


def test_misbehave_and_features_reach_the_testbed_config(tmp_path: Path) -> None:
    r = _pytest(tmp_path, "--harness-misbehave", "used-len-zero",
                "--harness-misbehave", "tx-stall:after=3", "--harness-features", "mtu=9000")
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_bad_misbehave_is_a_usage_error(tmp_path: Path) -> None:
    r = _pytest(tmp_path, "--harness-misbehave", "no-such-case")
    assert r.returncode == 4, r.stdout + r.stderr  # pytest's usage error
    assert "no-such-case" in r.stderr and "Traceback" not in r.stderr, r.stderr
