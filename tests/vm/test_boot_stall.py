"""A boot that never reaches /init's KTAP line is reported as stalled, with where QEMU's vCPUs
are, read from this QEMU's own `info registers -a` (so a change in its text shows here).

The guest runs a shell instead of /init (`rdinit=/bin/sh`): it boots fully and idles, on any
accelerator, and never prints the header. The pinned kernel is given as a modules tree with a
System.map beside it, one symbol long, so the report's names come through the real path
(kernel.locate -> Testbed._symbols -> stall.summarize) under the PVH entry.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from harness import paths
from harness.runner import VmTestConfig, run_vm_test

from .conftest import need_root, record

pytestmark = pytest.mark.vm


def pinned_as_modules_tree(root: Path) -> Path:
    """<root>/lib/modules/<v> and <root>/boot/{vmlinuz,config,System.map}-<v>, made of links to
    the pinned kernel's files in the cache."""
    env = paths.load_env()
    version = env.kernel_version
    cached = Path(env.kernel).parent
    mdir = root / "lib" / "modules" / version
    (mdir / "kernel").mkdir(parents=True)
    for name, path in env.modules.items():
        (mdir / "kernel" / f"{name}{''.join(Path(path).suffixes)}").symlink_to(path)
    (mdir / "modules.builtin").symlink_to(cached / "modules.builtin")
    boot = root / "boot"
    boot.mkdir()
    (boot / f"vmlinuz-{version}").symlink_to(env.kernel)
    (boot / f"config-{version}").symlink_to(cached / f"config-{version}")
    (boot / f"System.map-{version}").write_text("ffffffff81000000 T _text\n")
    return mdir


def test_a_stalled_boot_says_where_the_vcpus_are(tmp_path: Path) -> None:
    need_root()
    result = run_vm_test(VmTestConfig(
        kernel=pinned_as_modules_tree(tmp_path / "k"), append=("rdinit=/bin/sh",),
        boot_timeout=10, timeout=60, tcp_bytes=1 << 16, udp_count=5, out_dir=tmp_path / "run"))
    record("boot stall", result)
    assert result.error is not None and result.error.startswith("the guest's boot stalled"), \
        result.error
    # Both vCPUs, in the kernel (the shell idles), named from the System.map.
    assert "CPU0 kernel text RIP=0xffffffff8" in result.error, result.error
    assert "CPU1 kernel text" in result.error and "_text+0x" in result.error, result.error
    assert "no driver has probed it" not in result.error  # the kernel did probe the device
    report = (Path(result.run_dir) / "boot-stall.txt").read_text()
    assert report.count("CPU#1") == 2 and "--- info pci ---" in report
