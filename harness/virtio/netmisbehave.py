"""What the virtio-net device does when a misbehaviour is due (harness.virtio.misbehave holds
which are switched on and when each fires; harness.virtio.misbehave_catalogue names them).

Three hooks, called by the device only while a misbehaviour is on (``device.misbehave`` is not
None), so a device that behaves never runs any of this:

- ``tx_stalled``: before a TX flush (``tx-stall``: TX is no longer consumed);
- ``rx_header``: on each frame just received, before its chains are pushed (the ``rx-header``
  cases write a header the spec forbids);
- ``device_event``: after each TX flush and RX batch (interrupt storms, link flaps, config
  changes without the interrupt or generation the spec requires, NEEDS_RESET).
"""

from __future__ import annotations

import logging
import struct
from typing import TYPE_CHECKING

from harness.virtio import constants as C
from harness.virtio import rxhdr
from harness.virtio.chain import Chain
from harness.virtio.misbehave import Misbehave
from harness.virtio.netdefs import U16

if TYPE_CHECKING:
    from harness.virtio.net import VirtioNetDevice

log = logging.getLogger("harness.virtio.net")


def tx_stalled(mb: Misbehave) -> bool:
    """True when TX is stalled (tx-stall fired now or before)."""
    if not mb.tx_stalled and mb.due("tx", "tx0") is not None:
        mb.tx_stalled = True
        log.warning("misbehave tx-stall: TX is no longer consumed")
    return mb.tx_stalled


def rx_header(mb: Misbehave, first: Chain, views: list[memoryview], used: int,
              got: int) -> None:
    """One rx-header case on the frame just received into ``views`` (the pool's buffers,
    ``first``'s first: every chain holds a whole vnet header, so header offsets stay in it)."""
    s = mb.due("rx-header", "rx0")
    if s is None:
        return
    case = s.case
    if case == "data-valid-bad-csum":
        end = min(got, first.write_len) - 1  # inside the frame and the first chain
        if got >= 128:
            rxhdr.write_at(views, 0, b"\x02")  # DATA_VALID
            # flip the frame's byte at ``end``
            rxhdr.write_at(views, end, bytes([rxhdr.read_at(views, end, 1)[0] ^ 0xFF]))
    elif case == "rx-header-reserved-flags":
        rxhdr.write_at(views, 0, b"\xf8")
    elif case == "num-buffers-zero":
        rxhdr.write_at(views, C.NET_HDR_NUM_BUFFERS_OFFSET, U16.pack(0))
    elif case == "num-buffers-too-large":
        rxhdr.write_at(views, C.NET_HDR_NUM_BUFFERS_OFFSET, U16.pack(used + 1))
    elif case == "gso-size-zero":  # gso_type TCPV4, gso_size (bytes 4..5) 0
        rxhdr.write_at(views, 1, b"\x01")
        rxhdr.write_at(views, 4, b"\0\0")
    elif case == "csum-start-beyond-frame":  # NEEDS_CSUM, csum_start, csum_offset
        rxhdr.write_at(views, 0, b"\x01")
        rxhdr.write_at(views, 6, struct.pack("<HH", 0xFFF0, 16))
    else:  # bad-gso-type
        rxhdr.write_at(views, 1, b"\x7f")


def device_event(dev: VirtioNetDevice, mb: Misbehave) -> None:
    """The device-wide case due now, if any."""
    s = mb.due("device", None)
    if s is None:
        return
    if s.case == "interrupt-storm":
        for q in dev.queues:
            if s.queue in ("any", q.name) and q.msix_vector != C.NO_VECTOR:
                for _ in range(64):
                    dev.irq.trigger(q.msix_vector)
    elif s.case == "link-flap":
        dev.set_link(False)
        dev.set_link(True)
    elif s.case in ("config-change-no-interrupt", "mac-change-after-negotiation",
                    "config-generation-stale"):
        dev.mac = dev.mac[:5] + bytes([dev.mac[5] ^ 1])
        log.warning("misbehave %s: MAC now %s", s.case, dev.mac.hex(":"))
        if s.case == "mac-change-after-negotiation":
            dev.config_changed()
        elif s.case == "config-generation-stale":
            config_irqs(dev, 1)
    elif s.case == "config-interrupt-storm":
        config_irqs(dev, 64)
    elif s.case == "needs-reset-no-interrupt":
        dev.status |= C.STATUS_NEEDS_RESET
    else:  # needs-reset-midtraffic
        dev.device_error("misbehave needs-reset-midtraffic (no real error)")


def publish_released(dev: VirtioNetDevice, mb: Misbehave) -> None:
    """Queues whose wrong used.idx (used-idx-jump, used-idx-backwards) has stood its time
    publish the right one now, with the interrupt the driver asks for: their next completion
    may never come (a driver that survived the wrong value may be waiting for this one)."""
    over = mb.publish_over()
    for q in dev.queues:
        if q.name in over and q.flush():
            dev._queue_interrupt(q)


def config_irqs(dev: VirtioNetDevice, n: int) -> None:
    """``n`` config interrupts without a generation bump (misbehaviours only)."""
    dev.isr |= C.ISR_CONFIG
    for _ in range(n):
        if dev.msix_config != C.NO_VECTOR:
            dev.irq.trigger(dev.msix_config)
