"""The misbehaviour catalogue: each case with the virtio 1.3 clause it breaks, the real-world bug
class it stands for and what the device does (harness.virtio.misbehave runs them).

Clause numbers are those of virtio 1.3 (csd01) as the author remembers them, checked against
the 1.2 text where the numbering is the same; section titles are given so they can be found.

Not possible on this device yet (so not cases): a control queue answering every command with
an error or never answering (needs CTRL_VQ), MTU changing after negotiation and queue-pair
cases (need MTU config writes / MQ), packed-ring wrap counter and flag errors (need
RING_PACKED), out-of-order completion *with* IN_ORDER negotiated (needs IN_ORDER).
"""

from __future__ import annotations

from dataclasses import dataclass

QUEUES = ("rx0", "tx0", "any")

#: Where a case acts: "used" (push: a used element's id/len), "publish" (flush: used.idx),
#: "rx-header" (the RX vnet header), "tx" (TX processing), "device" (after a batch: config,
#: status, interrupts), "interrupt" (a used-buffer notification being sent), "status" (the
#: driver writing or reading the device status), "features" (the driver reading the offered
#: features).
POINTS = ("used", "publish", "rx-header", "tx", "device", "interrupt", "status", "features")


#: A case's own timeout unless it says otherwise (Case.timeout).
CASE_TIMEOUT = 60.0


@dataclass(frozen=True)
class Case:
    name: str
    point: str
    #: Queues the case can act on (its spec's ``queue`` must be one of them or "any").
    queues: tuple[str, ...]
    clause: str
    bug_class: str
    what: str
    #: How the catalogue (harness misbehave) runs it: after this many completions (200: the
    #: interface is up and traffic flowing; 0 for cases that act while the driver probes)
    #: and whether always (a case whose single firing shows nothing).
    after: int = 200
    always: bool = False
    #: The queue the catalogue runs it on ("any": the first of ``queues`` due). Pinned where
    #: the guest's reaction depends on the queue: a lost or misrouted RX notification stalls
    #: RX for good (Linux re-arms RX only from its RX poll), and whether that ends the plan as
    #: failed steps or as a timeout depends on which step it lands in, so the class would
    #: change from run to run (CI saw graceful turn into hang); on tx0 the driver recovers
    #: (its RX poll also cleans TX, and a full TX ring re-arms), the same on every kernel.
    queue: str = "any"
    #: Seconds a run of it may take before it counts as a hang. A case at CASE_TIMEOUT whose
    #: baseline is a hang gets harness.misbehave_run.HANG_TIMEOUT instead; a longer one keeps
    #: its own (its graceful reaction waits for the guest's own timeouts: judged at the hang
    #: budget it would stay a hang for good).
    timeout: float = CASE_TIMEOUT


CASES: dict[str, Case] = {c.name: c for c in (
    Case("used-len-overflow", "used", ("rx0",),
         "2.7.8.2 (Device Requirements: The Virtqueue Used Ring): the device MUST NOT set "
         "len larger than the total writable length of the buffer (from memory)",
         "RX length trusted by the driver: CVE-2021-47352 class, 2025 virtio-net 'fix "
         "received length check in big packets'",
         "RX used.len = the chain's writable length + 4096"),
    Case("used-len-zero", "used", ("rx0",),
         "2.7.8.2: len is the number of bytes written into the buffer; the device MUST set "
         "it to at least the bytes written (a frame with header was written)",
         "driver accepts a runt / zero-length completion (underflow of len - hdr_len)",
         "RX used.len = 0 for a chain the device filled"),
    Case("used-id-out-of-range", "used", ("rx0", "tx0"),
         "2.7.8 (The Virtqueue Used Ring): id indexes the start of the used descriptor "
         "chain; a descriptor index is < Queue Size (2.7.5)",
         "driver indexes its per-descriptor state with a device-supplied id (OOB read/write)",
         "used.id = queue size + head"),
    Case("used-id-duplicate", "used", ("rx0", "tx0"),
         "2.7.8 / 2.7.13: a descriptor chain is returned once per time it was made available "
         "(from memory: no explicit MUST, implied by the ownership transfer)",
         "double completion: use-after-free / double free of the driver's buffer token",
         "the completed chain's used element is written twice (two used entries)"),
    Case("used-idx-jump", "publish", ("rx0", "tx0"),
         "2.7.8.2: the device MUST NOT make more buffers used than were made available; "
         "used.idx - last seen idx can then never exceed Queue Size",
         "driver walks stale used entries when the index runs ahead (virtqueue_get_buf on "
         "garbage)",
         "used.idx published as the right value + queue size + 1 (once), with an interrupt; "
         "it stands for 0.5 s (the queue publishes nothing else), then is corrected"),
    Case("used-idx-backwards", "publish", ("rx0", "tx0"),
         "2.7.8 (The Virtqueue Used Ring): idx indicates where the device would put the next "
         "descriptor entry; it only ever increments (modulo 2^16) (from memory)",
         "driver computes the number of new entries as used.idx - last_used (u16 underflow)",
         "used.idx published as one less than the last value published (once, at the first "
         "publish after the driver took everything before it: its used_event there, with "
         "EVENT_IDX), with an interrupt; the unpublished slot after the new entries holds an "
         "id no queue has; it stands for 0.5 s (the queue publishes nothing else), then is "
         "corrected"),
    Case("num-buffers-too-large", "rx-header", ("rx0",),
         "5.1.6.4.1: the device MUST set num_buffers to the number of descriptors (chains) "
         "used for the packet",
         "driver takes the next packet's buffer as the rest of this one (merged frame from "
         "two packets) or waits for buffers that never come",
         "RX header num_buffers = the real count + 1"),
    Case("gso-size-zero", "rx-header", ("rx0",),
         "5.1.6.4.1: with a GSO type set the device MUST set gso_size to the MSS (> 0), and "
         "only use GSO types the driver negotiated (GUEST_TSO4 is not, by default)",
         "gso_size 0 reaching skb_shinfo(skb)->gso_size: divide-by-zero / endless "
         "segmentation class (virtio_net_hdr_to_skb hardening, 2021-2024)",
         "RX header gso_type = TCPV4, gso_size = 0"),
    Case("csum-start-beyond-frame", "rx-header", ("rx0",),
         "5.1.6.4.1: with NEEDS_CSUM, csum_start and csum_offset MUST point inside the "
         "packet (from memory: the checksum is to be written at csum_start + csum_offset)",
         "unchecked checksum offsets: out-of-bounds checksum write in the stack "
         "(skb_partial_csum_set class)",
         "RX header flags = NEEDS_CSUM, csum_start = 0xfff0, csum_offset = 16"),
    Case("num-buffers-zero", "rx-header", ("rx0",),
         "5.1.6.4 (Processing of Incoming Packets), 5.1.6.4.1: the device MUST set "
         "num_buffers to the number of descriptors (chains) used for the packet (>= 1)",
         "num_buffers trusted as a loop count (--num_buf underflow in receive_mergeable)",
         "RX header num_buffers = 0"),
    Case("bad-gso-type", "rx-header", ("rx0",),
         "5.1.6.4.1: the device MUST set gso_type to one of VIRTIO_NET_HDR_GSO_* (and only "
         "a GSO type the driver negotiated)",
         "unchecked vnet header fields reaching the stack (virtio_net_hdr_to_skb class, "
         "syzkaller GSO bugs)",
         "RX header gso_type = 0x7f"),
    Case("tx-stall", "tx", ("tx0",),
         "2.7.13 / 2.9 (Device Operation): buffers made available are eventually used; the "
         "device processes the queue after a notification (no MUST: liveness)",
         "TX timeout / watchdog path of the driver (virtnet_tx_timeout, netdev watchdog)",
         "TX chains are no longer consumed (kicks ignored) from then on"),
    Case("interrupt-storm", "device", ("rx0", "tx0"),
         "2.7.14 / 4.1.5.4 (used buffer notification): the device sends a used buffer "
         "notification after making buffers used (from memory: spurious ones are allowed "
         "but not expected in bulk)",
         "spurious interrupts: IRQ_NONE accounting, 'nobody cared' disabling the vector",
         "64 extra used-buffer interrupts with nothing new used, after every batch"),
    Case("link-flap", "device", ("rx0", "tx0"),
         "none broken: 5.1.4 (status: VIRTIO_NET_S_LINK_UP) and 4.1.4.3.1 (generation, "
         "config interrupt) are followed for each change; a legal but hostile sequence",
         "carrier handling races: link down/up work racing with NAPI and TX (netif_carrier "
         "flapping, stale queue state after carrier on)",
         "link down then up at once: two generation bumps, two config interrupts"),
    Case("config-change-no-interrupt", "device", ("rx0", "tx0"),
         "2.5.1 / 4.1.4.3.1: the device MUST change config_generation and (4.1.5.3) send a "
         "configuration change notification when device configuration changes",
         "driver caches config and never re-reads it (stale MAC/link, torn config reads)",
         "the MAC changes (last byte ^ 1) without a generation bump or config interrupt"),
    Case("needs-reset-midtraffic", "device", ("rx0", "tx0"),
         "2.1.2 (Device Status Field: DEVICE_NEEDS_RESET): the device sets it when it has "
         "experienced an error from which it can't recover; here with no error at all",
         "driver ignores or mishandles DEVICE_NEEDS_RESET (Linux has no handler in "
         "virtio_net)",
         "DEVICE_NEEDS_RESET + config interrupt; the device then stops serving queues"),
    # ---- added with issue 13's second half ----------------------------------------------
    Case("tx-used-len-nonzero", "used", ("tx0",),
         "2.7.8.2: len is the number of bytes written into the buffer; a TX chain is "
         "device-readable only, so the device writes nothing (len 0)",
         "driver uses len of a TX completion (byte accounting, BQL netdev_completed_queue "
         "with a device-supplied count)",
         "TX used.len = the chain's readable length (bytes the device could not have written)"),
    Case("rx-len-below-header", "used", ("rx0",),
         "2.7.8.2 and 5.1.6.4: the device MUST set len to at least the bytes written, and an "
         "RX buffer always starts with a whole struct virtio_net_hdr (12 bytes)",
         "len - hdr_len underflow: 'virtio_net: fix received length check' class "
         "(runt frame below the header size, 2023/2025 fixes)",
         "RX used.len = 5 (less than the 12-byte vnet header)"),
    Case("tx-completion-wrong-id", "used", ("tx0",),
         "2.7.8: id is the head of the chain being completed (here: another head, "
         "possibly one still in flight or never made available)",
         "driver frees the wrong skb / an skb still queued (use-after-free of a TX buffer)",
         "TX used.id = head ^ 1 (a neighbouring descriptor)"),
    Case("used-out-of-order", "used", ("rx0", "tx0"),
         "2.7.8 / 5.1.6 without VIRTIO_F_IN_ORDER: out of order is legal; with IN_ORDER "
         "(2.7.10, not offered here) it would break 'used in the order made available'",
         "driver assuming in-order completion (the IN_ORDER class; batched TX reclaim)",
         "one completion (with MRG_RXBUF a whole RX frame, never split: 5.1.6.4) is held back "
         "and written after the next one (swapped pair)"),
    Case("used-never-returned", "used", ("rx0", "tx0"),
         "2.7.13 / 2.9: buffers made available are eventually used (liveness, no MUST); "
         "here one chain is unmapped and never appears in the used ring",
         "descriptor leak: the driver's free count shrinks for good (ring slowly runs dry)",
         "one completion (with MRG_RXBUF a whole RX frame, never split: 5.1.6.4) is dropped: "
         "its used elements are never written"),
    Case("data-valid-bad-csum", "rx-header", ("rx0",),
         "5.1.6.4.1: the device MAY set DATA_VALID only when it validated the checksum "
         "(with GUEST_CSUM); here a frame whose payload was changed after validation",
         "silent data corruption: the stack trusts CHECKSUM_UNNECESSARY (offload bugs "
         "delivering corrupt data, 2019-2024 NIC firmware class)",
         "RX header flags = DATA_VALID and the frame's last byte flipped, on every frame of "
         "128 bytes or more (data, not bare ACKs)",
         always=True),
    Case("rx-header-reserved-flags", "rx-header", ("rx0",),
         "5.1.6 (struct virtio_net_hdr flags): only NEEDS_CSUM, DATA_VALID and RSC_INFO are "
         "defined; the device MUST NOT set others (reserved bits)",
         "unknown header flags passed on (virtio_net_hdr_to_skb validation class)",
         "RX header flags = 0xf8 (every reserved bit)"),
    Case("lost-interrupt", "interrupt", ("rx0", "tx0"),
         "2.7.14 / 4.1.5.2: the device MUST send a used buffer notification unless "
         "suppressed (flags/event idx); here one is skipped although the driver asked",
         "lost interrupt: RX stalls until something else kicks NAPI (the 'missed "
         "notification' class of event-idx races)",
         "one used-buffer notification the driver asked for is not sent (used.idx updated)",
         after=100, queue="tx0"),
    Case("interrupt-wrong-vector", "interrupt", ("rx0", "tx0"),
         "4.1.4.3 / 4.1.5.2 (MSI-X vector per queue): the notification of a queue MUST use "
         "the vector set in queue_msix_vector",
         "interrupt routing bugs: the right queue is never polled (stall) and the wrong "
         "handler runs with nothing to do",
         "one notification is sent on the other queue's vector", after=100, queue="tx0"),
    Case("lost-interrupt-rx", "interrupt", ("rx0",),
         "2.7.14 / 4.1.5.2: as lost-interrupt, on the receive queue",
         "missed RX notification with EVENT_IDX: the driver re-arms RX only from its RX poll, "
         "which nothing schedules any more (RX stalls for good, nothing on the console)",
         "one RX used-buffer notification the driver asked for is not sent (used.idx "
         "updated), the first after 50 ms of silence on rx0: the driver surely waits for it",
         after=9, queue="rx0"),
    Case("interrupt-wrong-vector-rx", "interrupt", ("rx0",),
         "4.1.4.3 / 4.1.5.2: as interrupt-wrong-vector, for the receive queue",
         "RX notification routed to the TX handler: the RX poll is never scheduled (stall)",
         "one RX notification is sent on tx0's vector, the first after 50 ms of silence on "
         "rx0: the driver surely waits for it", after=9, queue="rx0"),
    Case("slow-completions", "interrupt", ("rx0", "tx0"),
         "none broken (2.7.13: no deadline for using buffers); a legal but very slow device",
         "timeouts tuned for fast hardware: TX watchdog, TCP RTO, NAPI budget behaviour "
         "under a slow device",
         "every used-buffer notification is delayed 20 ms (the device loop sleeps)",
         always=True),
    Case("mac-change-after-negotiation", "device", ("rx0", "tx0"),
         "5.1.4 (mac: the device's address, read at probe); changing it after DRIVER_OK, "
         "even announced (generation bump + config interrupt), is outside the contract",
         "driver ignoring or racing a config change it never expects (stale filters)",
         "MAC last byte ^ 1 with a generation bump and config interrupt"),
    Case("config-generation-stale", "device", ("rx0", "tx0"),
         "2.5.1 / 4.1.4.3.1: the device MUST change config_generation when device "
         "configuration changes (here: a config interrupt, a change, no bump)",
         "torn config reads: the driver's generation loop accepts a half-old config",
         "MAC last byte ^ 1 with a config interrupt but no generation bump"),
    Case("config-interrupt-storm", "device", ("rx0", "tx0"),
         "4.1.5.3: a configuration change notification is sent when config changes (here "
         "64 with nothing changed)",
         "config-change work queued in bulk: workqueue storms, rtnl contention",
         "64 config interrupts (ISR config bit set), no change, after every batch",
         always=True),
    Case("needs-reset-no-interrupt", "device", ("rx0", "tx0"),
         "2.1.2 / 4.1.5.3: setting DEVICE_NEEDS_RESET is a config change and MUST be "
         "notified; here it is set silently and the device stops serving queues",
         "a device that dies silently: the driver only notices through its watchdog",
         "status |= DEVICE_NEEDS_RESET, no interrupt",
         # The plan on 7.3.4 ends 55-146 s in (which steps time out depends on where the
         # device stops: 30 s for a receive, 60 s for a send or for connect retries, 20 s for
         # UDP): at 60 s its class was a race with the timeout.
         timeout=180.0),
    Case("features-ok-refused", "status", ("rx0", "tx0"),
         "3.1.1 (Device Initialization): the device clears FEATURES_OK when it does not "
         "accept the features; here it refuses a subset it offered itself",
         "probe failure paths (virtio_features_ok -ENODEV): unwinding of a half-probed "
         "device",
         "the FEATURES_OK bit is dropped from every status write (probe fails)",
         after=0, always=True),
    Case("reset-never-completes", "status", ("rx0", "tx0"),
         "2.4.1 (Device Reset): the driver SHOULD wait for status 0; the device MUST "
         "reinitialize and read 0 after reset (here not for 2000 reads, then it does)",
         "unbounded reset polling: vp_modern reset loops 'while (get_status()) msleep(1)'",
         "after each reset, status reads back the old value for 2000 reads (bounded)",
         after=0),
    Case("needs-reset-during-probe", "status", ("rx0", "tx0"),
         "2.1.2: DEVICE_NEEDS_RESET when the device has hit an error; here at FEATURES_OK, "
         "before DRIVER_OK, with no error",
         "probe path ignoring device status (no check after FEATURES_OK)",
         "the FEATURES_OK write leaves status with DEVICE_NEEDS_RESET set",
         after=0),
    Case("forbidden-feature-combo", "features", ("rx0", "tx0"),
         "5.1.3.1 (Feature bit requirements): GUEST_TSO4 requires GUEST_CSUM; the device "
         "offers TSO4 without CSUM",
         "driver not validating feature dependencies (virtnet_validate_features class)",
         "offered features gain GUEST_TSO4 and lose GUEST_CSUM (from the first read)",
         after=0),
)}
