"""The split ring's RX burst in C (``harness_rx_burst``; part of harness.vfu.burst's C_SOURCE).

Up to ``budget`` frames from the backend's fd into the RX ring, as
``NetRxPath.on_backend_readable`` receives them with an empty pool: chains are staged (at most 1024
at once: a room that needs more, in a queue that large, is the Python path's) (walked and mapped
FROM_DEVICE) from the avail ring until they hold room for the largest frame (``rx_room``: with
MRG_RXBUF, or every chain the ring has; one chain without), one ``readv`` fills them, the vnet
header is judged as ``harness.virtio.rxhdr.check`` judges it (the same verdicts and repairs: a
gso_type not negotiated or with ECN dropped, an oversize frame dropped, a partial checksum finished
for a driver without GUEST_CSUM, flags it cannot take cleared), num_buffers is written and the
chains the frame filled are completed. Staged chains a frame did not fill are not consumed: they
stay in the ring for the next frame, or the next burst, which stages them again (so the ledger
counts their mapping once per burst; the Python pool keeps them mapped instead). A chain the Python
path would refuse (device-readable buffers, room for no vnet header, a buffer in read-only or
absent memory, a bad indirect table, an avail jump) ends the burst before the frame, with SLOW; too
little room in the ring ends it with NOBUFS; an empty backend with EMPTY. The caller then runs the
Python path (pool gather, starvation, refusals), which has the ring exactly as the guest left it
minus the completed frames. Frame counters come back for the caller to add: packets, bytes, drops
(runts, and frames whose header was refused, also counted as header or oversize drops), finished
checksums.

The C here uses what harness.vfu.burst's part of the source defines (``harness_vq_t``,
``harness_chain``, ``harness_next_head``, ``harness_push``, ``harness_vq_start``), which comes
before it in the compiled source. Plain strings only: harness.vfu.build imports this module
before the extension exists.
"""

from __future__ import annotations

#: The C of ``harness_rx_burst`` and its helpers: scattering into and reading from the staged
#: buffers, the checksum a driver without GUEST_CSUM needs finished, the vnet header's verdict.
C_SOURCE = r"""
/* ---- RX: the frame scattered over the staged buffers ---- */

static void harness_io_rw(struct iovec *iov, int n, uint64_t off, uint8_t *data, uint64_t len,
                          int store)
{
    int k;

    for (k = 0; k < n && len; k++) {
        uint64_t have = iov[k].iov_len;
        if (off >= have) {
            off -= have;
            continue;
        }
        uint64_t take = have - off < len ? have - off : len;
        if (store) {
            memcpy((uint8_t *)iov[k].iov_base + off, data, take);
        } else {
            memcpy(data, (uint8_t *)iov[k].iov_base + off, take);
        }
        data += take;
        len -= take;
        off = 0;
    }
}

/* rxhdr.finish_csum: 0 when the offsets do not fit the frame (nothing written). */
static int harness_finish_csum(struct iovec *iov, int n, uint64_t got, uint64_t hdr,
                               uint64_t start, uint64_t offset)
{
    uint64_t frame_len = got - hdr, pos, total = 0;
    uint8_t out[2];
    int k;

    if (start + offset + 2 > frame_len || offset % 2) {
        return 0;
    }
    /* the frame from start on as little-endian 16-bit words (an odd last byte padded) */
    pos = 0;
    for (k = 0; k < n; k++) {
        const uint8_t *b = iov[k].iov_base;
        uint64_t j;
        for (j = 0; j < iov[k].iov_len; j++, pos++) {
            if (pos >= got) {
                break;
            }
            if (pos >= hdr + start) {
                total += (uint64_t)b[j] << (((pos - hdr - start) & 1) * 8);
            }
        }
    }
    while (total >> 16) {
        total = (total & 0xFFFF) + (total >> 16);
    }
    total = ~total & 0xFFFF;
    out[0] = total & 0xFF;
    out[1] = total >> 8;
    harness_io_rw(iov, n, hdr + start + offset, out, 2, 1);
    return 1;
}

/* rxhdr.check: 0 ok, 1 checksum finished, 2 header the driver cannot take, 3 oversize. */
static int harness_rx_check(const harness_vq_t *q, struct iovec *iov, int n, uint64_t got)
{
    uint8_t h[12];
    uint8_t flags, gso;
    int verdict = 0;

    harness_io_rw(iov, n, 0, h, 12, 0);
    flags = h[0];
    gso = h[1];
    if (gso != 0) {
        uint8_t type = gso & 0x7F;
        uint32_t need = type == 1 ? HARNESS_OFFER_TSO4 : type == 4 ? HARNESS_OFFER_TSO6 : 0;
        if (!need || (gso & 0x80) || !(q->offers & need)) {
            return 2;
        }
    } else if (got - q->hdr_len > q->frame_max) {
        return 3;
    }
    if (flags && !(q->offers & HARNESS_OFFER_CSUM)) {
        uint8_t zero = 0;
        if (flags & 1) {
            uint64_t start = h[6] | (uint64_t)h[7] << 8, offset = h[8] | (uint64_t)h[9] << 8;
            if (!harness_finish_csum(iov, n, got, q->hdr_len, start, offset)) {
                return 2;
            }
            verdict = 1;
        }
        harness_io_rw(iov, n, 0, &zero, 1, 1);
    } else if (flags & ~3) {
        uint8_t keep = flags & 3;
        harness_io_rw(iov, n, 0, &keep, 1, 1);
    }
    return verdict;
}

static uint32_t harness_rx_burst(harness_vq_t *q, uint32_t budget)
{
    struct iovec iov[HARNESS_VQ_IOV];
    uint32_t heads[HARNESS_VQ_CHAINS], lens[HARNESS_VQ_CHAINS], niov[HARNESS_VQ_CHAINS];
    uint32_t first = 0, count = 0, done = 0;   /* staged chains: [first, first + count) */
    uint32_t cursor = q->next_avail;           /* the ring position staging goes on from */
    uint64_t room = 0;
    int io0 = 0, ion = 0;                      /* their iovecs: iov[io0 .. io0 + ion) */

    harness_vq_start(q);
    while (done < budget) {
        ssize_t got;
        uint64_t left;
        uint32_t used = 0, k;
        uint16_t nb;
        uint8_t le[2];
        int verdict, io;

        /* Room for the largest frame (every chain the ring has, if less), one chain without
         * MRG_RXBUF: as _rx_gather gathers it. */
        while (q->mrg ? room < q->rx_room && count < q->size : count == 0) {
            harness_walk_t w;
            uint32_t head = 0;
            int r = harness_next_head(q, cursor, &head), n;

            if (r > 0) {
                break;
            }
            if (r < 0 || count == HARNESS_VQ_CHAINS) {   /* a jump; or a queue over 1024 */
                q->stop = HARNESS_STOP_SLOW;
                goto out;
            }
            if (first + count == HARNESS_VQ_CHAINS) {   /* compact the staging arrays */
                memmove(heads, heads + first, count * sizeof(heads[0]));
                memmove(lens, lens + first, count * sizeof(lens[0]));
                memmove(niov, niov + first, count * sizeof(niov[0]));
                first = 0;
            }
            if (io0 && io0 + ion > HARNESS_VQ_IOV - 64) {   /* and the iovecs */
                memmove(iov, iov + io0, ion * sizeof(iov[0]));
                io0 = 0;
            }
            n = harness_chain(q, head, 1, iov, io0 + ion, 0xFFFFFFFFULL, &w);
            if (n < 0) {
                q->stop = HARNESS_STOP_SLOW;
                goto out;
            }
            heads[first + count] = head;
            lens[first + count] = (uint32_t)w.total;
            niov[first + count] = (uint32_t)n;
            count++;
            ion += n;
            room += w.total;
            cursor = (cursor + 1) & 0xFFFF;
            q->pieces += (uint64_t)n + w.table_pieces;
            q->map_bytes += w.total + w.table_bytes;
            if (w.peak - (uint32_t)io0 > q->max_pieces) {   /* the staged chains' too */
                q->max_pieces = w.peak - (uint32_t)io0;
            }
        }
        if (q->mrg ? room < q->rx_room && count < q->size : count == 0) {
            q->stop = HARNESS_STOP_NOBUFS;
            break;
        }
        got = readv(q->fd, iov + io0, ion);
        if (got <= 0) {
            if (got < 0 && errno != EAGAIN) {
                q->last_errno = errno;
            }
            q->stop = HARNESS_STOP_EMPTY;
            break;
        }
        if ((uint64_t)got < q->hdr_len) {
            q->drops++;   /* a runt without a whole vnet header: the chains stay staged */
            continue;
        }
        verdict = harness_rx_check(q, iov + io0, ion, (uint64_t)got);
        if (verdict >= 2) {
            q->drops++;
            if (verdict == 3) {
                q->oversize_drops++;
            } else {
                q->header_drops++;
            }
            continue;
        }
        q->csum_completed += verdict;
        left = (uint64_t)got;
        for (k = 0; k < count && left; k++) {
            left -= left < lens[first + k] ? left : lens[first + k];
            used++;
        }
        nb = (uint16_t)used;
        le[0] = nb & 0xFF;
        le[1] = nb >> 8;
        harness_io_rw(iov + io0, ion, 10, le, 2, 1);   /* num_buffers */
        left = (uint64_t)got;
        io = 0;
        for (k = 0; k < used; k++) {
            uint32_t len = lens[first + k];
            uint32_t part = left < len ? (uint32_t)left : len;
            harness_push(q, heads[first + k], part);
            left -= part;
            room -= len;
            io += (int)niov[first + k];
        }
        if (q->publish_each) {   /* the frame's entries before the index that shows them */
            __atomic_thread_fence(__ATOMIC_RELEASE);
            ((volatile uint16_t *)q->used)[1] = (uint16_t)q->used_idx;
        }
        first += used;
        count -= used;
        io0 += io;
        ion -= io;
        if (!count) {
            first = 0;
            io0 = 0;
        }
        q->packets++;
        q->bytes += (uint64_t)got - q->hdr_len;
        done++;
    }
out:
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return done;
}
"""
