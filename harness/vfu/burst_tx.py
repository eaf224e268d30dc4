"""The split ring's TX burst in C (``harness_tx_burst``; part of harness.vfu.burst's C_SOURCE).

One call takes up to ``budget`` chains off a split virtqueue's avail ring and writes each as one
frame with one ``writev`` to the backend's fd: the loop the device's Python TX path runs per
chain (``SplitVirtqueue.pop``, the DMA ledger's fused ``map_sg`` over ``DirectMapOps``, the
backend's ``writev``, ``push``), for the chains where every check of that path passes. It takes
only such chains; the first chain it would not take it leaves in the ring, untouched, and
returns SLOW, and the Python path then pops that chain and judges it in its own order
and words (breaking the queue, counting a violation, dropping the frame). So what the guest can
observe (used entries, frames on the wire, counters) is what the Python path would do, and every
refusal, log line and NEEDS_RESET still comes from the one place that has them.

What a chain must be, exactly the checks it stands in for (the walk is harness.vfu.burst's
``harness_chain``):
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

The C here uses what harness.vfu.burst's part of the source defines (``harness_vq_t``,
``harness_chain``, ``harness_next_head``, ``harness_push``, ``harness_vq_start``), which comes
before it in the compiled source. Plain strings only: harness.vfu.build imports this module
before the extension exists.
"""

from __future__ import annotations

#: The C of ``harness_tx_burst`` (declared in harness.vfu.burst's CDEF).
C_SOURCE = r"""
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
"""
