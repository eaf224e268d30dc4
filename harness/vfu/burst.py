"""The split ring's TX and RX bursts in C (in ``harness.vfu._vfu``; run by harness.virtio.fastpath).

This module is their shared part and the one harness.vfu.build compiles: the stop and offer
constants, the queue and region structs (``CDEF``, declared once for cdef and source), and the
C both bursts use: the region lookup, the descriptor walk (``harness_walk``, ``harness_chain``),
``harness_next_head``, ``harness_push`` and ``harness_vq_start``. ``C_SOURCE`` is that C followed
by the TX burst (harness.vfu.burst_tx, whose docstring says what a TX chain must be) and the RX
burst (harness.vfu.burst_rx). All three are plain strings and constants, importable before the
extension exists.

Every guest value is read once (volatile loads into locals): the guest may rewrite the ring
while we read it, and a value checked must be the value used. Barriers are the Python path's:
an acquire load of avail.idx and a full fence before the entries it published are read. Used
entries are written into the ring; publishing used.idx and the interrupt decision stay with
``SplitVirtqueue.flush``, once per batch, as before.

The host pointers of the regions and rings come from the caller, which rebuilds them whenever
guest memory changes (``GuestMemory.generation``) or the rings are remapped: nothing here is
valid across a DMA_UNMAP, and nothing here runs across one (the server is single-threaded).
"""

from __future__ import annotations

from harness.vfu import burst_rx, burst_tx

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
    uint32_t publish_each;
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

#: The C both bursts use, first in C_SOURCE: constants, the structs, the region lookup, the
#: descriptor walk, taking a head off the avail ring, pushing a used entry, starting a burst.
_C_SHARED = r"""
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
"""

#: The C of both bursts, in the order it always had: the shared part, TX, RX.
C_SOURCE = _C_SHARED + burst_tx.C_SOURCE + burst_rx.C_SOURCE
