"""The kernel matrix: bookworm's 6.1, trixie's 6.12 (each suite's current kernel, fetched) and the
pinned trixie-backports 7.3, each running the plan directly and behind a vIOMMU. One pytest
result per cell, with its throughput in the summary at the end of the run. Every kernel boots
through its PVH entry (harness.guest.pvh), but 7.3 direct, which boots its bzImage: both entries
stay tested."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.runner import VmTestConfig, run_vm_test

from .conftest import need_root, record

pytestmark = pytest.mark.vm
KERNELS = {"6.1": Path("debian:6.1"), "6.12": Path("debian:6.12"), "7.3": None}


@pytest.mark.parametrize("viommu", [False, True], ids=["direct", "viommu"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernel_matrix_cell(kernel: str, viommu: bool, tmp_path: Path) -> None:
    need_root()
    boot = "bzimage" if (kernel, viommu) == ("7.3", False) else "pvh"
    result = run_vm_test(VmTestConfig(kernel=KERNELS[kernel], viommu=viommu, boot=boot,
                                      tcp_bytes=16 << 20, udp_count=300, out_dir=tmp_path))
    record(f"kernel {kernel} {'viommu' if viommu else 'direct'}", result)
    assert result.error is None, result.error
    assert result.kernel_version.startswith(kernel), result.kernel_version
    assert result.deps["boot"].startswith(f"{boot}:"), result.deps["boot"]
    argv = (Path(result.run_dir) / "qemu.cmdline").read_text().split()
    image = argv[argv.index("-kernel") + 1]
    assert image.endswith(".vmlinux") == (boot == "pvh"), image
    failed = [f"{c.name}: {c.detail}" for c in result.failed]
    assert not failed, failed
    assert result.ok
