"""Per-run virtio-net feature switches, spelled like QEMU's device properties.

``parse("csum=off,mtu=9000,mq=4")`` starts from ``DEFAULTS`` (what users run: checksum
and TSO offloads both ways, MRG_RXBUF, EVENT_IDX, INDIRECT_DESC, STATUS, MAC) and applies each
switch in order; the result is checked against the feature dependencies of virtio 1.3
5.1.3.1 (a device must not offer HOST_TSO4 without CSUM, GUEST_TSO4 without GUEST_CSUM, ...).
``mq=N`` (N in 1..4) offers VIRTIO_NET_F_MQ with N queue pairs; MQ needs CTRL_VQ (5.1.3.1), so
``mq=N`` switches ctrl_vq on, and ``ctrl_vq=off`` given with it is an error; ``mq=off`` (the
default) is one queue pair without MQ. ``guest_announce`` (VIRTIO_NET_F_GUEST_ANNOUNCE, needs
CTRL_VQ) follows ctrl_vq unless said: switching ctrl_vq on (or mq=N) switches it on too,
``guest_announce=off`` keeps it off. ``ring_reset`` (VIRTIO_F_RING_RESET, per-queue reset) is on
by default (Linux 6.1, 6.12, 7.3 take it; it acts only when the driver resets a queue, as
ethtool -G does). ``packed`` (VIRTIO_F_RING_PACKED: every queue a packed ring, virtio 1.3
2.8) is off by default. Every problem is a ``ValueError`` whose message is one
line naming the switch, so the CLIs can print it as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

from harness.virtio import constants as C

#: switch name -> feature bit.
SWITCHES: dict[str, int] = {
    "csum": C.NET_F_CSUM,
    "guest_csum": C.NET_F_GUEST_CSUM,
    "host_tso4": C.NET_F_HOST_TSO4,
    "host_tso6": C.NET_F_HOST_TSO6,
    "guest_tso4": C.NET_F_GUEST_TSO4,
    "guest_tso6": C.NET_F_GUEST_TSO6,
    "mrg_rxbuf": C.NET_F_MRG_RXBUF,
    "status": C.NET_F_STATUS,
    "mac": C.NET_F_MAC,
    "event_idx": C.F_EVENT_IDX,
    "indirect": C.F_INDIRECT_DESC,
    "ctrl_vq": C.NET_F_CTRL_VQ,
    "ctrl_rx": C.NET_F_CTRL_RX,
    "ctrl_rx_extra": C.NET_F_CTRL_RX_EXTRA,
    "ctrl_mac_addr": C.NET_F_CTRL_MAC_ADDR,
    "guest_announce": C.NET_F_GUEST_ANNOUNCE,
    "ring_reset": C.F_RING_RESET,
    "packed": C.F_RING_PACKED,
}
#: The switches ``--offloads`` (and TestbedConfig.offloads) turn on or off together.
OFFLOAD_SWITCHES = ("csum", "guest_csum", "host_tso4", "host_tso6", "guest_tso4", "guest_tso6")
#: Feature -> the feature it needs (virtio 1.3 5.1.3.1), by switch name.
REQUIRES = {
    "host_tso4": "csum",
    "host_tso6": "csum",
    "guest_tso4": "guest_csum",
    "guest_tso6": "guest_csum",
    "ctrl_rx": "ctrl_vq",
    "ctrl_rx_extra": "ctrl_rx",
    "ctrl_mac_addr": "ctrl_vq",
    "guest_announce": "ctrl_vq",
}

_ON = {"on", "true", "yes", "1"}
_OFF = {"off", "false", "no", "0"}
#: 68: the smallest IPv4 MTU (RFC 791), and what Linux's virtio_net refuses below; 65535: the
#: config field is 16 bits.
MTU_MIN, MTU_MAX = 68, 65535
#: Queue pairs ``mq=N`` may offer (the device keeps one TAP fd per pair).
MQ_MAX = 4

#: Off by default: the control queue (a third queue; new, not yet in the sweep's defaults) and
#: announcements (they follow ctrl_vq: see parse).
#: The packed ring (``packed``, VIRTIO_F_RING_PACKED) is off by default like QEMU's ``packed``
#: property: Linux uses it whenever it is offered, and the suite's baselines are split rings.
DEFAULT_OFF = frozenset({"ctrl_vq", "ctrl_rx", "ctrl_rx_extra", "ctrl_mac_addr",
                         "guest_announce", "packed"})
DEFAULT_ON = frozenset(SWITCHES) - DEFAULT_OFF


@dataclass(frozen=True)
class NetFeatures:
    """The device features of one run: the switches that are on and the MTU (None: no
    VIRTIO_NET_F_MTU offered)."""

    on: frozenset[str] = DEFAULT_ON
    mtu: int | None = None
    #: Queue pairs with VIRTIO_NET_F_MQ offered (None: MQ not offered, one pair).
    mq: int | None = None

    @property
    def bits(self) -> int:
        """The virtio-net and ring feature bits (VERSION_1 included; transport bits such as
        ACCESS_PLATFORM are the server's to add)."""
        bits = 1 << C.F_VERSION_1
        for name in self.on:
            bits |= 1 << SWITCHES[name]
        if self.mtu is not None:
            bits |= 1 << C.NET_F_MTU
        if self.mq is not None:
            bits |= 1 << C.NET_F_MQ
        return bits

    @property
    def pairs(self) -> int:
        """Queue pairs the device has (max_virtqueue_pairs)."""
        return self.mq if self.mq is not None else 1

    @property
    def offloads(self) -> bool:
        """Whether any checksum/TSO offload is on (QEMU's built-in reference gets the same)."""
        return any(n in self.on for n in OFFLOAD_SWITCHES)

    def spec(self) -> str:
        """The switches that differ from DEFAULTS, as ``parse`` reads them back ("" if none)."""
        words: list[str] = []
        names = list(SWITCHES)
        if not any(n in self.on for n in OFFLOAD_SWITCHES):  # the six as one switch
            words.append("offloads=off")
            names = [n for n in names if n not in OFFLOAD_SWITCHES]
        # guest_announce's default is ctrl_vq's state (parse switches it along).
        follows = {"guest_announce": "ctrl_vq" in self.on}
        words += [f"{n}={'on' if n in self.on else 'off'}" for n in names
                  if (n in self.on) != follows.get(n, n in DEFAULT_ON)]
        if self.mtu is not None:
            words.append(f"mtu={self.mtu}")
        if self.mq is not None:
            words.append(f"mq={self.mq}")
        return ",".join(words)


DEFAULTS = NetFeatures()


def parse(text: str, *, base: NetFeatures = DEFAULTS) -> NetFeatures:
    """Apply ``name=value`` switches (comma separated, later ones win) to ``base``, then check
    the combination; ValueError with a one-line reason for anything wrong."""
    on = set(base.on)
    mtu = base.mtu
    mq = base.mq
    ctrl_vq_off = False  # ctrl_vq=off said in this text: mq=N must not switch it back on
    announce_said = False  # guest_announce said in this text: it no longer follows ctrl_vq
    for word in (w.strip() for w in text.split(",")):
        if not word:
            continue
        name, eq, value = word.partition("=")
        name, value = name.strip().lower(), value.strip().lower()
        if not eq or not value:
            raise ValueError(f"feature switch {word!r} has no value (name=on|off, mtu=N)")
        if name == "mtu":
            if value in _OFF:
                mtu = None
                continue
            if not value.isdigit() or not MTU_MIN <= int(value) <= MTU_MAX:
                raise ValueError(f"mtu={value}: not a number from {MTU_MIN} to {MTU_MAX} "
                                 "(or off)")
            mtu = int(value)
            continue
        if name == "mq":
            if value in _OFF:
                mq = None
                continue
            if not value.isdigit() or not 1 <= int(value) <= MQ_MAX:
                raise ValueError(f"mq={value}: not a number of queue pairs from 1 to {MQ_MAX} "
                                 "(or off)")
            mq = int(value)
            continue
        if name == "offloads":  # the --offloads switch, spelled as a feature
            names: tuple[str, ...] = OFFLOAD_SWITCHES
        elif name in SWITCHES:
            names = (name,)
        else:
            raise ValueError(f"unknown feature {name!r} (known: {', '.join(SWITCHES)}, "
                             "offloads, mtu, mq)")
        announce_said = announce_said or "guest_announce" in names
        if value in _ON:
            on.update(names)
            ctrl_vq_off = ctrl_vq_off and "ctrl_vq" not in names
        elif value in _OFF:
            on.difference_update(names)
            ctrl_vq_off = ctrl_vq_off or "ctrl_vq" in names
        else:
            raise ValueError(f"{name}={value}: the value must be on or off")
    if mq is not None:
        if ctrl_vq_off:
            raise ValueError(f"mq={mq} needs ctrl_vq=on (virtio 1.3 5.1.3.1)")
        on.add("ctrl_vq")
    if not announce_said:  # follows ctrl_vq when it changed here (mq=N included)
        if "ctrl_vq" not in on:
            on.discard("guest_announce")
        elif "ctrl_vq" not in base.on:
            on.add("guest_announce")
    result = NetFeatures(frozenset(on), mtu, mq)
    check(result)
    return result


def check(f: NetFeatures) -> None:
    """ValueError (one line) when ``f`` breaks a feature dependency of 5.1.3.1."""
    for name, needed in REQUIRES.items():
        if name in f.on and needed not in f.on:
            raise ValueError(f"{name}=on needs {needed}=on (virtio 1.3 5.1.3.1)")
    if f.mq is not None and "ctrl_vq" not in f.on:
        raise ValueError(f"mq={f.mq} needs ctrl_vq=on (virtio 1.3 5.1.3.1)")


def check_bits(bits: int) -> None:
    """The dependency check on raw feature bits (for devices built from a bit mask)."""
    for name, needed in REQUIRES.items():
        if bits >> SWITCHES[name] & 1 and not bits >> SWITCHES[needed] & 1:
            raise ValueError(f"{name} offered without {needed} (virtio 1.3 5.1.3.1)")
    if bits >> C.NET_F_MQ & 1 and not bits >> C.NET_F_CTRL_VQ & 1:
        raise ValueError("mq offered without ctrl_vq (virtio 1.3 5.1.3.1)")


def resolve(text: str = "", offloads: bool | None = None) -> NetFeatures:
    """A run's features: DEFAULTS, then ``offloads`` (None: leave as they are; True/False:
    all offload switches on/off, the older ``--offloads`` spelling), then ``text``."""
    base = DEFAULTS
    if offloads is not None:
        base = parse(f"offloads={'on' if offloads else 'off'}")
    return parse(text, base=base)
