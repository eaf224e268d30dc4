"""Kernel verdicts from console text: each kind a failed case with its excerpt."""

from __future__ import annotations

import pytest

from harness.vm.verdicts import kernel_cases, scan

WARN = """[   12.1] ------------[ cut here ]------------
[   12.1] WARNING: CPU: 1 PID: 77 at drivers/net/virtio_net.c:1234 receive_buf+0x1a/0x200
[   12.1] Modules linked in: virtio_net net_failover failover
[   12.2] ---[ end trace 0000000000000000 ]---"""
SAMPLES = {
    "oops": "[ 3.2] BUG: kernel NULL pointer dereference, address: 0000000000000008\n"
            "[ 3.2] #PF: supervisor read access in kernel mode\n[ 3.2] Oops: 0000 [#1] SMP",
    "kasan": "[ 5.0] BUG: KASAN: slab-out-of-bounds in virtqueue_get_buf_ctx+0x1/0x2",
    "ubsan": "[ 5.0] UBSAN: shift-out-of-bounds in drivers/virtio/virtio_ring.c:100:5",
    "kfence": "[ 5.0] BUG: KFENCE: use-after-free read in receive_mergeable+0x1/0x2",
    "soft_lockup": "[ 50.0] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [ksoftirqd/0:15]",
    "hard_lockup": "[ 50.0] watchdog: Watchdog detected hard LOCKUP on cpu 1",
    "hung_task": "[ 300.0] INFO: task kworker/0:1:33 blocked for more than 120 seconds.",
    "rcu_stall": "[ 30.0] rcu: INFO: rcu_preempt self-detected stall on CPU",
    "panic": "[ 9.9] Kernel panic - not syncing: sysrq triggered crash",
    "bug": "[ 9.9] kernel BUG at drivers/virtio/virtio_ring.c:2000!",
    "warning": WARN,
}


@pytest.mark.parametrize("kind", list(SAMPLES))
def test_each_kind_is_its_own_failed_case(kind: str) -> None:
    console = "KTAP version 1\nok 1 link_up\n" + SAMPLES[kind] + "\nok 2 ping_host\n"
    cases = kernel_cases(console)
    names = [c.name for c in cases]
    assert f"kernel_{kind}" in names, names
    case = next(c for c in cases if c.name == f"kernel_{kind}")
    assert case.ok is False
    assert SAMPLES[kind].splitlines()[0].split("] ", 1)[1] in case.metrics["excerpt"]


def test_clean_console_passes() -> None:
    (case,) = kernel_cases("KTAP version 1\nok 1 link_up\n# harness: done\n")
    assert case.name == "kernel_clean" and case.ok is True


def test_allow_warnings_downgrades_only_warnings() -> None:
    cases = {c.name: c for c in kernel_cases(WARN + "\n" + SAMPLES["oops"],
                                             allow_warnings=True)}
    assert cases["kernel_warning"].ok is True
    assert "allowed" in cases["kernel_warning"].detail
    assert cases["kernel_oops"].ok is False


def test_counts_and_first_line() -> None:
    (f,) = scan("a\n" + SAMPLES["hung_task"] + "\nb\n" + SAMPLES["hung_task"] + "\n")
    assert (f.kind, f.count, f.first_line) == ("hung_task", 2, 2)
