"""The device process: one virtio-net PCI device served over vfio-user, backed by a TAP.

assembly  builds the device and its DMA glue (DeviceServer)
loop      the event loop that drives it (DeviceLoop)
control   the JSON-lines control protocol (ControlServer)
cli       options, signals and wiring: main()
"""

from __future__ import annotations


def main(argv: list[str] | None = None) -> int:
    """The device process's entry point (`harness serve`, `python -m harness.server`)."""
    # Imported on call: loop and control stay importable without pyroute2 and libvfio-user.
    from harness.server.cli import main as cli_main

    return cli_main(argv)


__all__ = ["main"]
