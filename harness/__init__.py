"""harness: a userspace virtio-net device over vfio-user, tested against a real QEMU guest."""

import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__: list[str] = []
