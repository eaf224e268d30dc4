"""DeviceServer's start-up: one that fails halfway leaves nothing behind (socket file, TAP)."""

from __future__ import annotations

from pathlib import Path

import pytest

from harness.server import assembly
from harness.server.assembly import DeviceServer, ServerConfig


class _FakeTap:
    closed = 0

    def __init__(self, *_args: object, **_kwargs: object) -> None:
        pass

    def close(self) -> None:
        _FakeTap.closed += 1


def test_a_start_that_fails_halfway_removes_its_socket_and_tap(
        monkeypatch: pytest.MonkeyPatch, sock_path: str) -> None:
    destroyed: list[str] = []
    monkeypatch.setattr("harness.net.tap.create", lambda *_a, **_k: None)
    monkeypatch.setattr("harness.net.tap.destroy", destroyed.append)
    monkeypatch.setattr(assembly, "Tap", _FakeTap)
    monkeypatch.setattr(assembly, "configure", lambda *_a, **_k: None)
    # A mistyped A/B knob is read when the device is built: after the vfio-user context
    # (and its socket file) exist.
    monkeypatch.setenv("HARNESS_BATCH_USED", "7")
    _FakeTap.closed = 0
    with pytest.raises(ValueError, match="HARNESS_BATCH_USED"):
        DeviceServer(ServerConfig(socket=Path(sock_path), tap="htap-test"))
    assert not Path(sock_path).exists()
    assert destroyed == ["htap-test"]
    assert _FakeTap.closed == 1
