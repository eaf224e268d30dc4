"""The virtio-net control virtqueue's commands (virtio 1.3 5.1.6.5), decoded and applied.

``ControlState`` holds what the driver sets through the control queue (RX modes, the MAC
filter table, the MAC address, announce acknowledgements, the number of queue pairs) and
``handle(command, negotiated)`` applies one command's device-readable bytes, returning the ack
byte the device writes back (VIRTIO_NET_OK or VIRTIO_NET_ERR). ``accepts(dst)`` is the receive
filter that state implies. Everything in a command is guest-controlled: lengths are checked
against the bytes actually given before anything is read, table sizes are bounded, and a
command the driver did not negotiate is refused with ERR (never an exception).

``serve_queue`` runs the control virtqueue: each chain is the command (device-readable) and
room for the ack (device-writable); the device offers CTRL_VQ, CTRL_RX, CTRL_RX_EXTRA,
CTRL_MAC_ADDR and GUEST_ANNOUNCE (and MQ, with ``mq=N``) only when the run switches them on
(harness.virtio.features). An announcement (5.1.6.5.4) is the device's to request
(``announce_pending``, VIRTIO_NET_S_ANNOUNCE in the config status) and the driver's ANNOUNCE_ACK
clears it; an ack with nothing pending is an ERR, as in QEMU.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from harness.virtio.chain import Virtqueue

# Feature bits (5.1.3).
NET_F_CTRL_VQ = 17
NET_F_CTRL_RX = 18
NET_F_CTRL_VLAN = 19
NET_F_CTRL_RX_EXTRA = 20
NET_F_GUEST_ANNOUNCE = 21
NET_F_MQ = 22
NET_F_CTRL_MAC_ADDR = 23

OK = 0
ERR = 1

CLASS_RX = 0
RX_PROMISC, RX_ALLMULTI, RX_ALLUNI, RX_NOMULTI, RX_NOUNI, RX_NOBCAST = range(6)
CLASS_MAC = 1
MAC_TABLE_SET = 0
MAC_ADDR_SET = 1
CLASS_VLAN = 2
CLASS_ANNOUNCE = 3
ANNOUNCE_ACK = 0
CLASS_MQ = 4
MQ_VQ_PAIRS_SET = 0
MQ_VQ_PAIRS_MIN = 1
MQ_VQ_PAIRS_MAX = 0x8000

#: Entries the device keeps per MAC table (QEMU keeps 64 in all; a longer table is accepted,
#: as QEMU does, by falling back to receiving everything of that kind).
MAC_TABLE_ENTRIES = 64
_RX_NAMES = ("promisc", "allmulti", "alluni", "nomulti", "nouni", "nobcast")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_BROADCAST = b"\xff" * 6
#: Longest command copied out of the guest (a MAC table of thousands of entries fits); a longer
#: one is answered ERR without being read.
COMMAND_MAX = 64 << 10


@dataclass
class ControlState:
    """What the driver configured through the control queue; ``reset()`` goes back to the
    defaults and keeps the counters (commands, errors)."""

    mac: bytes
    max_pairs: int = 1
    #: RX modes by name; promisc on by default as in QEMU (Linux turns it off at probe).
    rx: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(_RX_NAMES, False)
                                | {"promisc": True})
    uni: list[bytes] = field(default_factory=list)
    multi: list[bytes] = field(default_factory=list)
    uni_overflow: bool = False
    multi_overflow: bool = False
    pairs: int = 1
    #: The last VQ_PAIRS_SET value accepted (0: none), kept across resets like the counters:
    #: what the driver ran with, still readable in the stats taken after the final reset.
    pairs_set: int = 0
    announce_acks: int = 0
    #: VIRTIO_NET_S_ANNOUNCE: an announcement requested and not yet acknowledged.
    announce_pending: bool = False
    #: Announcements requested (the device's side; a counter like announce_acks).
    announces: int = 0
    #: Commands answered, commands refused (ERR) and why, last one: for the stats.
    commands: int = 0
    errors: int = 0
    last_error: str = ""

    def __post_init__(self) -> None:
        self.default_mac = self.mac

    def reset(self) -> None:
        """Device reset: the driver's settings go, the counters stay."""
        self.mac = self.default_mac
        self.rx = dict.fromkeys(_RX_NAMES, False) | {"promisc": True}
        self.uni, self.multi = [], []
        self.uni_overflow = self.multi_overflow = False
        self.pairs = 1
        self.announce_pending = False  # the bit is config state: gone with the reset

    def handle(self, command: bytes, negotiated: int) -> int:
        """Apply one command (class, command, data); OK or ERR."""
        self.commands += 1
        try:
            self._apply(command, negotiated)
        except _Refused as exc:
            self.errors += 1
            self.last_error = str(exc)
            return ERR
        return OK

    def _apply(self, command: bytes, feats: int) -> None:
        if not feats >> NET_F_CTRL_VQ & 1:
            raise _Refused("CTRL_VQ not negotiated")
        if len(command) < 2:
            raise _Refused(f"command of {len(command)} bytes: no class and command")
        cls, cmd, data = command[0], command[1], command[2:]
        if cls == CLASS_RX:
            self._rx(cmd, data, feats)
        elif cls == CLASS_MAC:
            self._mac(cmd, data, feats)
        elif cls == CLASS_ANNOUNCE and cmd == ANNOUNCE_ACK:
            _need(feats, NET_F_GUEST_ANNOUNCE, "GUEST_ANNOUNCE")
            if data:
                raise _Refused(f"ANNOUNCE_ACK with {len(data)} bytes of data")
            if not self.announce_pending:
                raise _Refused("ANNOUNCE_ACK with no announcement pending")
            self.announce_pending = False  # 5.1.6.5.4: the ack clears VIRTIO_NET_S_ANNOUNCE
            self.announce_acks += 1
        elif cls == CLASS_MQ and cmd == MQ_VQ_PAIRS_SET:
            _need(feats, NET_F_MQ, "MQ")
            if len(data) != 2:
                raise _Refused(f"VQ_PAIRS_SET with {len(data)} bytes of data")
            (pairs,) = _U16.unpack(data)
            if not MQ_VQ_PAIRS_MIN <= pairs <= min(self.max_pairs, MQ_VQ_PAIRS_MAX):
                raise _Refused(f"VQ_PAIRS_SET {pairs} outside 1..{self.max_pairs}")
            self.pairs = self.pairs_set = pairs
        else:
            raise _Refused(f"class {cls} command {cmd} not supported")

    def _rx(self, cmd: int, data: bytes, feats: int) -> None:
        _need(feats, NET_F_CTRL_RX, "CTRL_RX")
        if cmd >= len(_RX_NAMES):
            raise _Refused(f"RX command {cmd} unknown")
        if cmd >= RX_ALLUNI:
            _need(feats, NET_F_CTRL_RX_EXTRA, "CTRL_RX_EXTRA")
        if len(data) != 1:
            raise _Refused(f"RX command with {len(data)} bytes of data")
        self.rx[_RX_NAMES[cmd]] = bool(data[0])

    def _mac(self, cmd: int, data: bytes, feats: int) -> None:
        if cmd == MAC_ADDR_SET:
            _need(feats, NET_F_CTRL_MAC_ADDR, "CTRL_MAC_ADDR")
            if len(data) != 6:
                raise _Refused(f"MAC_ADDR_SET with {len(data)} bytes")
            self.mac = bytes(data)
            return
        if cmd != MAC_TABLE_SET:
            raise _Refused(f"MAC command {cmd} unknown")
        _need(feats, NET_F_CTRL_RX, "CTRL_RX")
        # Two tables back to back, each le32 entries then entries * 6 bytes; nothing after.
        tables: list[list[bytes]] = []
        at = 0
        for which in ("unicast", "multicast"):
            if len(data) - at < 4:
                raise _Refused(f"MAC_TABLE_SET: {which} table has no entry count")
            (n,) = _U32.unpack_from(data, at)
            at += 4
            if n > (len(data) - at) // 6:  # checked before anything is read or allocated
                raise _Refused(f"MAC_TABLE_SET: {which} table of {n} entries in "
                               f"{len(data) - at} bytes")
            tables.append([bytes(data[at + 6 * k : at + 6 * k + 6]) for k in range(n)])
            at += 6 * n
        if at != len(data):
            raise _Refused(f"MAC_TABLE_SET: {len(data) - at} bytes after the tables")
        uni, multi = tables
        self.uni_overflow = len(uni) > MAC_TABLE_ENTRIES
        self.multi_overflow = len(multi) > MAC_TABLE_ENTRIES
        self.uni = [] if self.uni_overflow else uni
        self.multi = [] if self.multi_overflow else multi

    def accepts(self, dst: bytes) -> bool:
        """Whether a frame to destination MAC ``dst`` passes the receive filter."""
        rx = self.rx
        if rx["promisc"]:
            return True
        if dst == _BROADCAST:
            return not rx["nobcast"]
        if dst[0] & 1:  # multicast
            if rx["nomulti"]:
                return False
            return rx["allmulti"] or self.multi_overflow or dst in self.multi
        if rx["nouni"]:
            return False
        return dst == self.mac or rx["alluni"] or self.uni_overflow or dst in self.uni

    def as_dict(self) -> dict[str, object]:
        return {"rx": dict(self.rx), "mac": self.mac.hex(":"),
                "uni": [m.hex(":") for m in self.uni], "multi": [m.hex(":") for m in self.multi],
                "uni_overflow": self.uni_overflow, "multi_overflow": self.multi_overflow,
                "pairs": self.pairs, "pairs_set": self.pairs_set,
                "announce_acks": self.announce_acks, "announces": self.announces,
                "announce_pending": self.announce_pending,
                "commands": self.commands, "errors": self.errors, "last_error": self.last_error}


def serve_queue(q: Virtqueue, state: ControlState, negotiated: int, batch: int = 64) -> bool:
    """Answer the control commands waiting in ``q``; True when the driver wants an interrupt.

    A chain without a 2-byte command or without a writable byte for the ack is malformed
    (the queue breaks: NEEDS_RESET); anything wrong inside a command is an ERR ack.
    """
    done = 0
    q.disable_notify()
    while done < batch:
        chain = q.pop()
        if chain is None:
            # Ask for the next kick (with EVENT_IDX: avail_event), then look once more: a
            # command made available in between would otherwise wait forever (Linux spins).
            if q.broken or not q.ready or not q.enable_notify():
                break
            q.disable_notify()
            continue
        done += 1
        if chain.read_len < 2 or chain.write_len < 1:
            what = "no command" if chain.read_len < 2 else "no room for the ack"
            q.discard(chain)
            q.fail(f"control chain with {what}", chain.head)
            break
        if chain.read_len > COMMAND_MAX:
            state.commands += 1
            state.errors += 1
            state.last_error = f"command of {chain.read_len} bytes (over {COMMAND_MAX})"
            ack = ERR
        else:
            ack = state.handle(b"".join([h.view for h in chain.readable]), negotiated)
        chain.writable[0].view[0] = ack
        q.push(chain, 1)
    else:
        q.enable_notify()  # the batch ran out: the next kick (or this one's leftovers) resumes
    return q.flush()


class _Refused(Exception):
    """A command the device answers with ERR: internal, never leaves this module."""


def _need(feats: int, bit: int, name: str) -> None:
    if not feats >> bit & 1:
        raise _Refused(f"{name} not negotiated")
