"""RX vnet headers the driver can take (virtio 1.3 5.1.6.4.1): the check and its repairs.

The TAP gets TUNSETOFFLOAD from the negotiated GUEST_* features at DRIVER_OK, so the kernel
normally hands the device only headers the driver negotiated; ``check`` is the device's own
guarantee for the rest (a TAP that cannot be told, offloads changing underneath). It looks at a
frame already read into the guest's buffers (``views``, ``got`` bytes, header first) and:

- a gso_type the driver did not negotiate (TCPV4/TCPV6 without GUEST_TSO4/6; UDP, UDP_L4 and the
  ECN bit are never offered): DROP_HEADER (it cannot be segmented here);
- no GSO and a frame longer than the MTU allows: DROP_OVERSIZE (5.1.4.1);
- NEEDS_CSUM for a driver without GUEST_CSUM: the checksum is finished here (the spec's SHOULD:
  a fully checksummed packet) and the flags cleared, CSUM_DONE; DROP_HEADER when csum_start
  and csum_offset do not fit the frame;
- DATA_VALID without GUEST_CSUM, RSC_INFO (RSC_EXT is never offered) and undefined bits:
  cleared.
"""

from __future__ import annotations

import enum
import struct

from harness.virtio import constants as C

HDR_F_NEEDS_CSUM = 1
HDR_F_DATA_VALID = 2
#: The flags a driver with GUEST_CSUM may be handed.
HDR_F_GUEST_CSUM = HDR_F_NEEDS_CSUM | HDR_F_DATA_VALID
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_TCPV6 = 4
GSO_ECN = 0x80
#: gso_type -> the feature the driver must have negotiated to be handed it.
GSO_FEATURE = {GSO_TCPV4: C.NET_F_GUEST_TSO4, GSO_TCPV6: C.NET_F_GUEST_TSO6}
_U16 = struct.Struct("<H")


class Verdict(enum.Enum):
    OK = "ok"
    CSUM_DONE = "checksum finished"
    DROP_HEADER = "header the driver cannot take"
    DROP_OVERSIZE = "longer than the MTU"


def check(views: list[memoryview], got: int, negotiated: int, frame_max: int) -> Verdict:
    """Make the frame's header one the driver negotiated, or say why it must be dropped."""
    head = read_at(views, 0, C.NET_HDR_SIZE)
    flags, gso = head[0], head[1]
    if gso != GSO_NONE:
        need = GSO_FEATURE.get(gso & ~GSO_ECN)
        if need is None or gso & GSO_ECN or not negotiated >> need & 1:
            return Verdict.DROP_HEADER
    elif got - C.NET_HDR_SIZE > frame_max:
        return Verdict.DROP_OVERSIZE
    verdict = Verdict.OK
    if flags and not negotiated >> C.NET_F_GUEST_CSUM & 1:
        if flags & HDR_F_NEEDS_CSUM:
            start, offset = struct.unpack_from("<HH", head, 6)
            if not finish_csum(views, got, start, offset):
                return Verdict.DROP_HEADER
            verdict = Verdict.CSUM_DONE
        write_at(views, 0, b"\0")
    elif flags & ~HDR_F_GUEST_CSUM:
        write_at(views, 0, bytes([flags & HDR_F_GUEST_CSUM]))
    return verdict


def read_at(views: list[memoryview], off: int, n: int) -> bytes:
    """``n`` bytes at offset ``off`` of the frame scattered over ``views`` (fewer at its end)."""
    out = bytearray()
    for view in views:
        if off < len(view):
            out += view[off : off + n - len(out)]
            if len(out) == n:
                break
            off = 0
        else:
            off -= len(view)
    return bytes(out)


def write_at(views: list[memoryview], off: int, data: bytes) -> None:
    """Write ``data`` at offset ``off`` of the frame scattered over ``views``."""
    for view in views:
        if off < len(view):
            take = min(len(data), len(view) - off)
            view[off : off + take] = data[:take]
            data = data[take:]
            if not data:
                return
            off = 0
        else:
            off -= len(view)


def finish_csum(views: list[memoryview], got: int, start: int, offset: int) -> bool:
    """Finish a partial checksum (NEEDS_CSUM): the Internet checksum of the frame from
    ``start`` on, folded into the pseudo-header sum the stack left at ``start + offset``.
    False when the offsets do not fit the frame (then nothing is written)."""
    frame_len = got - C.NET_HDR_SIZE
    if start + offset + 2 > frame_len or offset % 2:
        return False
    data = read_at(views, C.NET_HDR_SIZE + start, frame_len - start)
    if len(data) % 2:
        data += b"\0"
    # One's-complement sums are byte-order independent (RFC 1071): native little-endian words
    # summed, folded and stored little-endian give the network-order result.
    total = sum(memoryview(data).cast("H"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    write_at(views, C.NET_HDR_SIZE + start + offset, _U16.pack(~total & 0xFFFF))
    return True
