"""The split-ring TX burst in C (in ``harness.vfu._vfu``; driven by harness.virtio.txfast).

One call takes up to ``budget`` chains off a split virtqueue's avail ring and writes each as one
frame with one ``writev`` to the backend's fd: the loop the device's Python TX path runs per
chain (``SplitVirtqueue.pop``, the DMA ledger's fused ``map_sg`` over ``DirectMapOps``, the
backend's ``writev``, ``push``), for the chains where every check of that path passes. It takes
only such chains; the first chain it would not take it leaves in the ring, untouched, and
returns HARNESS_TX_SLOW, and the Python path then pops that chain and judges it in its own order
and words (breaking the queue, counting a violation, dropping the frame). So what the guest can
observe (used entries, frames on the wire, counters) is what the Python path would do, and every
refusal, log line and NEEDS_RESET still comes from the one place that has them.

What a chain must be, exactly the checks it stands in for:
- avail.idx no further than the queue size ahead of the device (else the Python path fails the
  queue); the head and every ``next`` below the queue size; at most ``size`` descriptors;
- no INDIRECT and no WRITE descriptor (the Python path walks indirect tables, and refuses a TX
  chain with device-writable buffers);
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

The host pointers of the regions and rings come from the caller, which rebuilds them whenever
guest memory changes (``GuestMemory.generation``) or the rings are remapped: nothing here is
valid across a DMA_UNMAP, and nothing here runs across one (the server is single-threaded).
"""

from __future__ import annotations

#: Why a burst stopped (``harness_txq_t.stop``).
EMPTY, BUDGET, SLOW = 0, 1, 2

CDEF = """
typedef struct {
    uint64_t iova;
    uint64_t last;
    uint8_t *host;
} harness_region_t;

typedef struct {
    const uint8_t *desc;
    const uint16_t *avail;
    uint32_t *used;
    uint32_t size;
    uint32_t next_avail;
    uint32_t avail_seen;
    uint32_t used_idx;
    const harness_region_t *regions;
    uint32_t nregions;
    uint64_t max_map;
    uint64_t hdr_len;
    uint64_t tx_max;
    int fd;
    uint64_t chains;
    uint64_t bytes;
    uint64_t pieces;
    uint64_t map_bytes;
    uint64_t write_errors;
    uint32_t max_pieces;
    int32_t last_errno;
    int32_t stop;
} harness_txq_t;

uint32_t harness_tx_burst(harness_txq_t *q, uint32_t budget);
"""

C_SOURCE = r"""
/* ---- the split-ring TX burst (see harness.vfu.txburst) ---------------------------------- */
#include <sys/uio.h>

#define HARNESS_TX_IOV 1024
#define HARNESS_DESC_F_NEXT 1
#define HARNESS_DESC_F_WRITE 2
#define HARNESS_DESC_F_INDIRECT 4

/* One guest memory region: [iova, last], host memory at host (NULL: none for the device). */
typedef struct {
    uint64_t iova;
    uint64_t last;
    uint8_t *host;
} harness_region_t;

typedef struct {
    const uint8_t *desc;        /* the rings, mapped by the Python side */
    const uint16_t *avail;
    uint32_t *used;
    uint32_t size;
    uint32_t next_avail;        /* in/out: the SplitVirtqueue's indices */
    uint32_t avail_seen;
    uint32_t used_idx;
    const harness_region_t *regions;   /* sorted by iova, not overlapping */
    uint32_t nregions;
    uint64_t max_map;
    uint64_t hdr_len;
    uint64_t tx_max;
    int fd;
    uint64_t chains;            /* out: what this burst did */
    uint64_t bytes;             /* frame bytes after the vnet header */
    uint64_t pieces;            /* mappings made (and unmapped) */
    uint64_t map_bytes;
    uint64_t write_errors;
    uint32_t max_pieces;        /* most mappings one chain held at once */
    int32_t last_errno;
    int32_t stop;               /* 0 ring empty, 1 budget spent, 2 a chain for the Python path */
} harness_txq_t;

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

/* The chain at head as iovecs, or -1: leave it to the Python path. *total: its length. */
static int harness_tx_chain(const harness_txq_t *q, uint32_t head, struct iovec *iov,
                            uint64_t *total)
{
    const volatile uint8_t *table = (const volatile uint8_t *)q->desc;
    uint32_t i = head, steps;
    uint64_t sum = 0;
    int n = 0;

    for (steps = 0; steps < q->size; steps++) {
        const volatile uint8_t *d = table + 16 * (size_t)i;
        uint64_t addr = *(const volatile uint64_t *)d;
        uint64_t left = *(const volatile uint32_t *)(d + 8);
        uint16_t flags = *(const volatile uint16_t *)(d + 12);
        uint16_t next = *(const volatile uint16_t *)(d + 14);

        if (flags & (HARNESS_DESC_F_INDIRECT | HARNESS_DESC_F_WRITE)) {
            return -1;
        }
        sum += left;
        if (sum > q->tx_max) {
            return -1;
        }
        while (left) {
            const harness_region_t *r = harness_region_of(q->regions, q->nregions, addr);
            uint64_t piece = left < q->max_map ? left : q->max_map;

            if (r == NULL || r->host == NULL || n == HARNESS_TX_IOV) {
                return -1;
            }
            if (piece - 1 > r->last - addr) {   /* split where the region ends */
                piece = r->last - addr + 1;
            }
            iov[n].iov_base = r->host + (addr - r->iova);
            iov[n].iov_len = piece;
            n++;
            left -= piece;
            addr += piece;
            if (left && addr == 0) {   /* past 2^64: no region translates it */
                return -1;
            }
        }
        if (!(flags & HARNESS_DESC_F_NEXT)) {
            if (sum < q->hdr_len) {
                return -1;
            }
            *total = sum;
            return n;
        }
        if (next >= q->size) {
            return -1;
        }
        i = next;
    }
    return -1;   /* a loop, or longer than the table */
}

static uint32_t harness_tx_burst(harness_txq_t *q, uint32_t budget)
{
    struct iovec iov[HARNESS_TX_IOV];
    const volatile uint16_t *avail = (const volatile uint16_t *)q->avail;
    volatile uint32_t *used = (volatile uint32_t *)q->used;
    uint32_t mask = q->size - 1, done = 0;

    q->chains = q->bytes = q->pieces = q->map_bytes = q->write_errors = 0;
    q->max_pieces = 0;
    q->last_errno = 0;
    q->stop = 1;
    while (done < budget) {
        uint64_t total = 0;
        uint32_t head, slot;
        int n;

        if (q->next_avail == q->avail_seen) {
            uint16_t idx = __atomic_load_n(&avail[1], __ATOMIC_ACQUIRE);
            if (idx == q->avail_seen) {
                q->stop = 0;
                break;
            }
            if ((uint16_t)(idx - q->next_avail) > q->size) {
                q->stop = 2;   /* the Python path fails the queue, in its words */
                break;
            }
            __sync_synchronize();   /* entries after the index that published them */
            q->avail_seen = idx;
        }
        head = avail[2 + (q->next_avail & mask)];
        n = head < q->size ? harness_tx_chain(q, head, iov, &total) : -1;
        if (n < 0) {
            q->stop = 2;
            break;
        }
        if (writev(q->fd, iov, n) < 0) {
            q->write_errors++;   /* dropped, as the backend's writev drops it */
            q->last_errno = errno;
        }
        slot = q->used_idx & mask;
        used[1 + 2 * slot] = head;
        used[2 + 2 * slot] = 0;
        q->used_idx = (q->used_idx + 1) & 0xFFFF;
        q->next_avail = (q->next_avail + 1) & 0xFFFF;
        q->chains++;
        q->bytes += total - q->hdr_len;
        q->pieces += (uint64_t)n;
        q->map_bytes += total;
        if ((uint32_t)n > q->max_pieces) {
            q->max_pieces = (uint32_t)n;
        }
        done++;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    return done;
}
"""
