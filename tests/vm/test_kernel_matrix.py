"""The kernel matrix: bookworm's 6.1, trixie's 6.12 (each suite's current kernel, fetched) and the
pinned trixie-backports 7.3, each running the plan directly and behind a vIOMMU. One pytest
result per cell, with its throughput in the summary at the end of the run."""

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
    result = run_vm_test(VmTestConfig(kernel=KERNELS[kernel], viommu=viommu,
                                      tcp_bytes=16 << 20, udp_count=300, out_dir=tmp_path))
    record(f"kernel {kernel} {'viommu' if viommu else 'direct'}", result)
    assert result.error is None, result.error
    assert result.kernel_version.startswith(kernel), result.kernel_version
    failed = [f"{c.name}: {c.detail}" for c in result.failed]
    assert not failed, failed
    assert result.ok
