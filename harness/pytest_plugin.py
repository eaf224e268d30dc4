"""The pytest plugin (entry point `pytest11: harness`): a booted Testbed as fixtures, for tests
that live in the user's own repository.

    def test_my_driver_change(testbed):
        out = testbed.guest.run("ping -c 3 198.18.0.1")
        assert out.returncode == 0
        assert testbed.device.stats()["ledger"]["violations_total"] == 0

Fixtures: `testbed` (a running harness.testbed.Testbed: guest up, link configured, its shell
idle), `guest` (the command channel, `guest.run(cmd)`), `device` (the first device server:
`stats()`, `request(cmd, ...)`), `qmp` (`qmp("query-pci")`), `testbed_config` (what it is built
from). Options: --harness-kernel, --harness-boot, --harness-map-ops, --harness-viommu,
--harness-offloads, --harness-accel, --harness-smp, --harness-memory. Per test, parametrize the
testbed indirectly with a dict of TestbedConfig fields:

    @pytest.mark.parametrize("testbed", [{"viommu": True}, {"map_ops": "bounce"}],
                             indirect=True)

Each test gets its own testbed (its own namespace, servers and QEMU), so tests are independent
and pytest-xdist can run them in parallel. Without root the fixtures skip, saying why.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

GUEST_READY_TIMEOUT = 180.0


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("harness", "vfio-user virtio-net testbed (harness)")
    g.addoption("--harness-kernel", type=Path, default=None, metavar="PATH",
                help="guest kernel under test: bzImage, build tree, /lib/modules/<v> tree, "
                     "or debian:6.1 / debian:6.12 (default: the pinned kernel)")
    g.addoption("--harness-boot", choices=["auto", "pvh", "bzimage"], default="auto",
                help="the kernel's PVH entry when it has one (auto), always (pvh), or its "
                     "bzImage (bzimage)")
    g.addoption("--harness-map-ops", choices=["direct", "bounce"], default="direct")
    g.addoption("--harness-viommu", action="store_true", help="device behind an intel-iommu")
    g.addoption("--harness-offloads", action="store_true", help="offer CSUM/TSO offloads "
                "(on by default now)")
    g.addoption("--harness-features", default="", metavar="NAME=on|off,...",
                help="device feature switches (harness.virtio.features), e.g. mtu=9000")
    g.addoption("--harness-misbehave", action="append", default=[], type=_misbehave_spec,
                metavar="CASE[:after=N][:queue=Q][:always]",
                help="the device breaks the virtio spec in this named way (repeatable)")
    g.addoption("--harness-accel", choices=["auto", "kvm", "tcg"], default="auto")
    g.addoption("--harness-smp", type=int, default=2)
    g.addoption("--harness-memory", type=int, default=512, metavar="MB")


def _misbehave_spec(text: str) -> str:
    """argparse type of --harness-misbehave: the same validation as `harness vm-test`."""
    from harness.virtio.misbehave import spec_list

    return spec_list(text)


@pytest.fixture
def testbed_config(request: pytest.FixtureRequest) -> Any:
    """The TestbedConfig for this test: command-line options, then the test's own params."""
    from harness.testbed import SHELL_CMDLINE, PeerSpec, TestbedConfig

    opt = request.config.getoption
    cfg = TestbedConfig(
        accel=opt("--harness-accel"), map_ops=opt("--harness-map-ops"),
        viommu=opt("--harness-viommu"), offloads=opt("--harness-offloads") or None,
        features=opt("--harness-features"),
        misbehave=tuple(opt("--harness-misbehave")),
        smp=opt("--harness-smp"), memory_mb=opt("--harness-memory"),
        kernel=opt("--harness-kernel"), boot=opt("--harness-boot"), console="socket",
        cmdline=SHELL_CMDLINE,
        peers=PeerSpec(timeout=24 * 3600.0))
    overrides = getattr(request, "param", None)  # parametrize("testbed_config", ...)
    return dataclasses.replace(cfg, **overrides) if isinstance(overrides, dict) else cfg


@pytest.fixture
def testbed(request: pytest.FixtureRequest, testbed_config: Any,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A booted testbed whose guest's command channel answers; stopped after the test."""
    if os.geteuid() != 0:
        pytest.skip("the harness testbed needs root (network namespaces, TAP devices)")
    from harness.testbed import Testbed

    cfg = testbed_config
    overrides = getattr(request, "param", None)  # parametrize("testbed", [{...}], indirect)
    if isinstance(overrides, dict):
        cfg = dataclasses.replace(cfg, **overrides)
    run_dir = tmp_path_factory.mktemp("testbed")
    with Testbed(cfg, run_dir) as tb:
        tb.wait_shell(GUEST_READY_TIMEOUT)
        yield tb


@pytest.fixture
def guest(testbed: Any) -> Any:
    """The guest command channel: `guest.run(cmd)` -> returncode, stdout, stderr."""
    return testbed.guest


@pytest.fixture
def device(testbed: Any) -> Any:
    """The first device server: `stats()`, `request(cmd, **args)`."""
    return testbed.device


@pytest.fixture
def qmp(testbed: Any) -> Callable[..., object]:
    """`qmp("query-pci")`: one QMP command on the harness's own monitor."""
    qmp_cmd: Callable[..., object] = testbed.qmp
    return qmp_cmd
