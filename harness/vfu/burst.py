"""The split ring's TX and RX bursts in C (in ``harness.vfu._vfu``; run by harness.virtio.fastpath).

**TX** (``harness_tx_burst``).

One call takes up to ``budget`` chains off a split virtqueue's avail ring and writes each as one
frame with one ``writev`` to the backend's fd: the loop the device's Python TX path runs per
chain (``SplitVirtqueue.pop``, the DMA ledger's fused ``map_sg`` over ``DirectMapOps``, the
backend's ``writev``, ``push``), for the chains where every check of that path passes. It takes
only such chains; the first chain it would not take it leaves in the ring, untouched, and
returns SLOW, and the Python path then pops that chain and judges it in its own order
and words (breaking the queue, counting a violation, dropping the frame). So what the guest can
observe (used entries, frames on the wire, counters) is what the Python path would do, and every
refusal, log line and NEEDS_RESET still comes from the one place that has them.

What a chain must be, exactly the checks it stands in for:
- avail.idx no further than the queue size ahead of the device (else the Python path fails the
  queue); the head and every ``next`` below the queue size; at most ``size`` descriptors;
- no WRITE descriptor (the Python path refuses a TX chain with device-writable buffers);
- at most one INDIRECT descriptor, last in the chain (no NEXT), with VIRTIO_F_INDIRECT_DESC
  negotiated, its table a whole number of descriptors (1 to 65536) inside one region with host
  memory; the table's own descriptors walked by the same rules, none of them INDIRECT. The
  table counts as mapped (in pieces of ``max_map``) and unmapped before its buffers are, as
  the Python path's ``_read_table`` maps it; a table across regions is the Python path's;
- each buffer, in pieces of at most ``max_map`` bytes split where a region ends, inside a region
  that has host memory (region.view not None), as ``DmaLedger._map_sg_fused`` maps it; the
  caller checks what holds for a whole burst (Bus Master Enable, the map-ops layers, the rings
  not needing syncs, no misbehaviour);
- a total length of at least the vnet header and at most TX_MAX, in at most 1024 pieces.

Every guest value is read once (volatile loads into locals): the guest may rewrite the ring
while we read it, and a value checked must be the value used. Barriers are the Python path's:
an acquire load of avail.idx and a full fence before the entries it published are read. Used
entries are written into the ring; publishing used.idx and the interrupt decision stay with
``SplitVirtqueue.flush``, once per batch, as before.

**RX** (``harness_rx_burst``). Up to ``budget`` frames from the backend's fd into the RX
ring, as ``NetRxPath.on_backend_readable`` receives them with an empty pool: chains are staged
(at most 1024 at once: a room that needs more, in a queue that large, is the Python path's)
(walked and mapped FROM_DEVICE) from the avail ring until they hold room for the largest frame
(``rx_room``: with MRG_RXBUF, or every chain the ring has; one chain without), one ``readv``
fills them, the vnet header is judged as ``harness.virtio.rxhdr.check`` judges it (the same
verdicts and repairs: a gso_type not negotiated or with ECN dropped, an oversize frame dropped,
a partial checksum finished for a driver without GUEST_CSUM, flags it cannot take cleared),
num_buffers is written and the chains the frame filled are completed. Staged chains a frame did
not fill are not consumed: they stay in the ring for the next frame, or the next burst, which
stages them again (so the ledger counts their mapping once per burst; the Python pool keeps
them mapped instead). A chain the Python path would refuse (device-readable buffers, room for no
vnet header, a buffer in read-only or absent memory, a bad indirect table, an avail jump) ends
the burst
before the frame, with SLOW; too little room in the ring ends it with NOBUFS; an empty backend
with EMPTY. The caller then runs the Python path (pool gather, starvation, refusals), which has
the ring exactly as the guest left it minus the completed frames. Frame counters come back for
the caller to add: packets, bytes, drops (runts, and frames whose header was refused, also
counted as header or oversize drops), finished checksums.

The host pointers of the regions and rings come from the caller, which rebuilds them whenever
guest memory changes (``GuestMemory.generation``) or the rings are remapped: nothing here is
valid across a DMA_UNMAP, and nothing here runs across one (the server is single-threaded).
"""

from __future__ import annotations

#: Why a burst stopped (``harness_vq_t.stop``).
EMPTY, BUDGET, SLOW, NOBUFS = 0, 1, 2, 3
#: ``harness_vq_t.offers``: the RX header features the driver negotiated.
OFFER_CSUM, OFFER_TSO4, OFFER_TSO6 = 1, 2, 4

_FIELDS = """
    uint32_t size;
    uint32_t next_avail;
    uint32_t avail_seen;
    uint32_t used_idx;
    uint32_t nregions;
    int32_t fd;
    uint64_t max_map;
    uint64_t hdr_len;
    uint64_t tx_max;
    uint64_t rx_room;
    uint64_t frame_max;
    uint32_t mrg;
    uint32_t offers;
    uint32_t indirect;
    uint64_t chains;
    uint64_t packets;
    uint64_t bytes;
    uint64_t pieces;
    uint64_t map_bytes;
    uint64_t write_errors;
    uint64_t drops;
    uint64_t header_drops;
    uint64_t oversize_drops;
    uint64_t csum_completed;
    uint32_t max_pieces;
    int32_t last_errno;
    int32_t stop;
"""

#: One guest memory region: [iova, last], host memory at host (NULL: none for the device);
#: declared once for cffi's cdef and the C source, as the queue fields above.
_REGION = """typedef struct {
    uint64_t iova;
    uint64_t last;
    uint8_t *host;
    uint32_t writable;
} harness_region_t;
"""

CDEF = _REGION + """
typedef struct {
    const uint8_t *desc;
    const uint16_t *avail;
    uint32_t *used;
    const harness_region_t *regions;
""" + _FIELDS + """} harness_vq_t;

uint32_t harness_tx_burst(harness_vq_t *q, uint32_t budget);
uint32_t harness_rx_burst(harness_vq_t *q, uint32_t budget);
"""

C_SOURCE = r"""
/* ---- the split ring's TX and RX bursts (see harness.vfu.burst) --------------------------- */
#include <sys/uio.h>

#define HARNESS_VQ_IOV 1024          /* IOV_MAX: one frame's pieces, one readv's buffers */
#define HARNESS_VQ_CHAINS 1024       /* the largest queue size */
#define HARNESS_DESC_F_NEXT 1
#define HARNESS_DESC_F_WRITE 2
#define HARNESS_DESC_F_INDIRECT 4
#define HARNESS_STOP_EMPTY 0
#define HARNESS_STOP_BUDGET 1
#define HARNESS_STOP_SLOW 2
#define HARNESS_STOP_NOBUFS 3
#define HARNESS_OFFER_CSUM 1
#define HARNESS_OFFER_TSO4 2
#define HARNESS_OFFER_TSO6 4

""" + _REGION + """
typedef struct {
    const uint8_t *desc;        /* the rings, mapped by the Python side */
    const uint16_t *avail;
    uint32_t *used;
    const harness_region_t *regions;   /* sorted by iova, not overlapping */
""" + _FIELDS + """} harness_vq_t;

static const harness_region_t *harness_region_of(const harness_region_t *r, uint32_t n,
                                                 uint64_t addr)
{
    uint32_t lo = 0, hi = n;

    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (addr < r[mid].iova) {
            hi = mid;
        } else if (addr > r[mid].last) {
            lo = mid + 1;
        } else {
            return &r[mid];
        }
    }
    return NULL;
}

/* What one chain's walk mapped besides its buffers' iovecs: its indirect table, mapped in
 * pieces and unmapped before the table's buffers are (as the Python path's _read_table does). */
typedef struct {
    uint64_t total;          /* the buffers' length */
    uint32_t table_pieces;   /* the indirect table's mappings (0: none) */
    uint64_t table_bytes;
    uint32_t peak;           /* most of the chain's mappings live at once */
} harness_walk_t;

/* Buffers of descriptors first.. of a table of n (the ring's, or an indirect one: top 0) as
 * iovecs appended at iov[*np]; 0 done, -1 leave the chain to the Python path. */
static int harness_walk(const harness_vq_t *q, const volatile uint8_t *table, uint32_t n,
                        uint32_t first, int top, int write, struct iovec *iov, int *np,
                        uint64_t limit, harness_walk_t *w)
{
    uint32_t i = first, steps;

    for (steps = 0; steps < n; steps++) {
        const volatile uint8_t *d = table + 16 * (size_t)i;
        uint64_t addr = *(const volatile uint64_t *)d;
        uint64_t left = *(const volatile uint32_t *)(d + 8);
        uint16_t flags = *(const volatile uint16_t *)(d + 12);
        uint16_t next = *(const volatile uint16_t *)(d + 14);

        if (flags & HARNESS_DESC_F_INDIRECT) {
            /* One table, last in the chain, in one region with host memory (else Python's:
             * nested, with NEXT, without the feature, a bad length, across regions). */
            const harness_region_t *r = harness_region_of(q->regions, q->nregions, addr);

            if (!top || !q->indirect || (flags & HARNESS_DESC_F_NEXT) || left == 0
                    || left % 16 || left / 16 > 0x10000
                    || r == NULL || r->host == NULL || left - 1 > r->last - addr) {
                return -1;
            }
            w->table_pieces = (uint32_t)(left / q->max_map + (left % q->max_map != 0));
            w->table_bytes = left;
            if ((uint32_t)*np + w->table_pieces > w->peak) {
                w->peak = (uint32_t)*np + w->table_pieces;
            }
            return harness_walk(q, (const volatile uint8_t *)(r->host + (addr - r->iova)),
                                (uint32_t)(left / 16), 0, 0, write, iov, np, limit, w);
        }
        if (!(flags & HARNESS_DESC_F_WRITE) != !write) {
            return -1;
        }
        w->total += left;
        if (w->total > limit) {
            return -1;
        }
        while (left) {
            const harness_region_t *r = harness_region_of(q->regions, q->nregions, addr);
            uint64_t piece = left < q->max_map ? left : q->max_map;

            if (r == NULL || r->host == NULL || (write && !r->writable)
                    || *np == HARNESS_VQ_IOV) {
                return -1;
            }
            if (piece - 1 > r->last - addr) {   /* split where the region ends */
                piece = r->last - addr + 1;
            }
            iov[*np].iov_base = r->host + (addr - r->iova);
            iov[*np].iov_len = piece;
            (*np)++;
            left -= piece;
            addr += piece;
            if (left && addr == 0) {   /* past 2^64: no region translates it */
                return -1;
            }
        }
        if (!(flags & HARNESS_DESC_F_NEXT)) {
            return 0;
        }
        if (next >= n) {
            return -1;
        }
        i = next;
    }
    return -1;   /* a loop, or longer than the table */
}

/* The chain at head as iovecs appended at iov[n0..]: their count, or -1 (leave it to the Python
 * path). write: the device writes it (RX: only WRITE descriptors, writable regions), else reads
 * it (TX: no WRITE descriptor). w: its length, at most limit, and its indirect table. */
static int harness_chain(const harness_vq_t *q, uint32_t head, int write, struct iovec *iov,
                         int n0, uint64_t limit, harness_walk_t *w)
{
    int n = n0;

    w->total = 0;
    w->table_pieces = 0;
    w->table_bytes = 0;
    w->peak = 0;
    if (head >= q->size
            || harness_walk(q, (const volatile uint8_t *)q->desc, q->size, head, 1, write, iov,
                            &n, limit, w) < 0
            || w->total < q->hdr_len) {
        return -1;
    }
    if ((uint32_t)n > w->peak) {
        w->peak = (uint32_t)n;
    }
    return n - n0;
}

/* The head of the next chain to take, reading avail.idx when the device has seen all of it:
 * 0 there is one (*head), 1 the ring is empty, -1 avail.idx jumped (the Python path's). */
static int harness_next_head(harness_vq_t *q, uint32_t pos, uint32_t *head)
{
    const volatile uint16_t *avail = (const volatile uint16_t *)q->avail;

    if (pos == q->avail_seen) {
        uint16_t idx = __atomic_load_n(&avail[1], __ATOMIC_ACQUIRE);
        if (idx == q->avail_seen) {
            return 1;
        }
        if ((uint16_t)(idx - pos) > q->size) {   /* pos: what the device has popped */
            return -1;
        }
        __sync_synchronize();   /* entries after the index that published them */
        q->avail_seen = idx;
    }
    *head = avail[2 + (pos & (q->size - 1))];
    return 0;
}

static void harness_push(harness_vq_t *q, uint32_t head, uint32_t len)
{
    volatile uint32_t *used = (volatile uint32_t *)q->used;
    uint32_t slot = q->used_idx & (q->size - 1);

    used[1 + 2 * slot] = head;
    used[2 + 2 * slot] = len;
    q->used_idx = (q->used_idx + 1) & 0xFFFF;
    q->next_avail = (q->next_avail + 1) & 0xFFFF;
    q->chains++;
}

static void harness_vq_start(harness_vq_t *q)
{
    q->chains = q->packets = q->bytes = q->pieces = q->map_bytes = q->write_errors = 0;
    q->drops = q->header_drops = q->oversize_drops = q->csum_completed = 0;
    q->max_pieces = 0;
    q->last_errno = 0;
    q->stop = HARNESS_STOP_BUDGET;
}

static uint32_t harness_tx_burst(harness_vq_t *q, uint32_t budget)
{
    struct iovec iov[HARNESS_VQ_IOV];
    uint32_t done = 0;

    harness_vq_start(q);
    while (done < budget) {
        harness_walk_t w;
        uint32_t head = 0;
        int n, r = harness_next_head(q, q->next_avail, &head);

        if (r) {
            q->stop = r > 0 ? HARNESS_STOP_EMPTY : HARNESS_STOP_SLOW;
            break;
        }
        n = harness_chain(q, head, 0, iov, 0, q->tx_max, &w);
        if (n < 0) {
            q->stop = HARNESS_STOP_SLOW;
            break;
        }
        if (writev(q->fd, iov, n) < 0) {
            q->write_errors++;   /* dropped, as the backend's writev drops it */
            q->last_errno = errno;
        }
        harness_push(q, head, 0);
        q->packets++;
        q->bytes += w.total - q->hdr_len;
        q->pieces += (uint64_t)n + w.table_pieces;
        q->map_bytes += w.total + w.table_bytes;
        if (w.peak > q->max_pieces) {
            q->max_pieces = w.peak;
        }
        done++;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return done;
}

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
