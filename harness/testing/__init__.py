"""Test support shipped with the package: mock virtio driver, fake backends and interrupts."""

from harness.testing.mockdriver import FakeBackend, FakeIrq, MockDriver, MockMemory, MockQueue

__all__ = ["FakeBackend", "FakeIrq", "MockDriver", "MockMemory", "MockQueue"]
