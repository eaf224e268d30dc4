"""Kernel verdicts with a real guest: a kernel crashed on purpose (sysrq c) is a failed case of
its own, with the console excerpt that proves it."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.runner import VmTestConfig, run_vm_test

from .conftest import need_root, record

pytestmark = pytest.mark.vm


def test_a_real_guest_panic_is_a_failed_case_with_its_excerpt(tmp_path: Path) -> None:
    need_root()
    result = run_vm_test(VmTestConfig(tcp_bytes=1 << 20, udp_count=10, out_dir=tmp_path,
                                      append=("harness.plan=link_up,sysrq_crash",)))
    record("kernel verdict (sysrq crash)", result)
    panic = result.case("kernel_panic")
    assert panic is not None, [c.name for c in result.cases]
    assert panic.ok is False
    assert "sysrq triggered crash" in panic.metrics["excerpt"]
    assert result.case("kernel_clean") is None
    assert not result.ok
    link = result.case("link_up")
    assert link is not None and link.ok  # the guest really ran before it crashed
