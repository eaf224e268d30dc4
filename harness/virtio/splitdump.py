"""The split ring's in-flight chains for ``SplitVirtqueue.dump`` (introspection only).

Decodes the chains between the device's used index and the guest's avail.idx the way the data
path would walk them (``SplitVirtqueue._walk_table``'s checks, in its order and words), but
recording instead of mapping: no data buffer is mapped, an indirect table is read through
``map_page`` as the data path reads it (not at all with Bus Master Enable clear), nothing is
counted as a queue error and the queue is never broken; what is wrong becomes an ``error``
field. The walk is bounded by a budget of steps per dump (DUMP_BUDGET_PER_DESCRIPTOR).
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING, Any

from harness.virtio.chain import DUMP_BUDGET_PER_DESCRIPTOR, ChainError, DumpBudgetSpent, DumpChain
from harness.virtio.constants import DESC_F_INDIRECT, DESC_F_NEXT, DESC_SIZE

if TYPE_CHECKING:
    from harness.virtio.virtqueue import SplitVirtqueue

__all__ = ["in_flight"]

_DESC = struct.Struct("<QIHH")


def in_flight(
    q: SplitVirtqueue, avail_idx: int, avail16: memoryview, may_map: bool, errors: list[str]
) -> list[dict[str, Any]]:
    """The chains between the device's used index and the guest's avail.idx, with their state
    (discarded, popped, available) and descriptors; problems appended to ``errors``."""
    size = q.size
    start = q._used_idx
    # Offsets from ``start``: [0, held) discarded, [held, taken) popped, then available.
    taken = (q._next_avail - start) & 0xFFFF
    held = (taken - q._outstanding) & 0xFFFF
    if (avail_idx - q._next_avail) & 0xFFFF > size:
        # What _refresh_avail would refuse: show only what the device has accepted.
        errors.append(f"avail idx jumped to {avail_idx} with {q._next_avail} consumed "
                      f"(size {size})")  # fmt: skip
        avail_idx = q._avail_seen
    count = (avail_idx - start) & 0xFFFF
    if count > size:
        errors.append(f"{count} chains between used idx {start} and avail idx {avail_idx} "
                      f"(size {size}): showing {size}")  # fmt: skip
        count = size
    budget = [DUMP_BUDGET_PER_DESCRIPTOR * size]
    chains: list[dict[str, Any]] = []
    for k in range(count):
        idx = (start + k) & 0xFFFF
        state = "discarded" if k < held else "popped" if k < taken else "available"
        slot = idx & (size - 1)
        entry: dict[str, Any] = {"slot": slot, "idx": idx, "state": state}
        entry.update(_chain(q, avail16[2 + slot], may_map, budget))
        chains.append(entry)
    return chains

def _chain(q: SplitVirtqueue, head: int, may_map: bool, budget: list[int]) -> dict[str, Any]:
    """One chain's descriptors, checked as _walk checks them, without mapping buffers."""
    chain = DumpChain(head)
    error = ""
    size = q.size
    if head >= size:
        error = f"head index {head} out of range (size {size})"
    else:
        table = q._desc
        assert table is not None
        try:
            _ring_table(q, table, head, size, chain, budget, may_map, top=True)
        except ChainError as e:
            where = f"desc {e.desc}" if e.desc >= 0 else ""
            where += f" iova {e.iova:#x}" if e.iova >= 0 else ""
            error = f"{where.strip()}: {e.reason}" if where else e.reason
        except DumpBudgetSpent:
            error = ("not decoded further: the dump's budget of "
                     f"{DUMP_BUDGET_PER_DESCRIPTOR * size} steps along next is spent")
    out: dict[str, Any] = {"head": head, "descriptors": chain.entries,
                           "read_len": chain.read_len, "write_len": chain.write_len}
    if error:
        out["error"] = error
    return out

def _ring_table(
    q: SplitVirtqueue, table: memoryview, first: int, n: int, chain: DumpChain, budget: list[int],
    may_map: bool, *, top: bool,
) -> None:  # fmt: skip
    """_walk_table's checks, in its order and words, recording instead of mapping."""
    i = first
    seen: set[int] = set()  # a descriptor walked again is not listed again
    for _ in range(n):
        if budget[0] <= 0:
            raise DumpBudgetSpent
        budget[0] -= 1
        addr, length, flags, nxt = _DESC.unpack_from(table, i * DESC_SIZE)
        if i not in seen:
            seen.add(i)
            entry: dict[str, int | bool] = {"desc": i, "addr": addr, "len": length,
                                            "flags": flags, "next": nxt}
            if not top:
                entry["indirect"] = True
            chain.entries.append(entry)
        if flags & DESC_F_INDIRECT:
            _indirect(q, i, addr, length, flags, chain, budget, may_map, top=top)
        elif length:
            q._dump_add(chain, i, addr, length, flags)
        if not flags & DESC_F_NEXT:
            return
        if nxt >= n:
            raise ChainError(f"next {nxt} out of range (table of {n})", i)
        i = nxt
    raise ChainError(f"descriptor loop or chain longer than {n}", first)

def _indirect(
    q: SplitVirtqueue, i: int, addr: int, length: int, flags: int, chain: DumpChain,
    budget: list[int], may_map: bool, *, top: bool,
) -> None:  # fmt: skip
    if not q.indirect:
        raise ChainError("INDIRECT descriptor without VIRTIO_F_INDIRECT_DESC", i, addr)
    if not top:
        raise ChainError("nested INDIRECT descriptor", i, addr)
    if flags & DESC_F_NEXT:
        raise ChainError("INDIRECT descriptor with NEXT", i, addr)
    q._check_table_length(i, addr, length)
    table = q._dump_table(i, addr, length, flags, may_map)
    _ring_table(q, table, 0, length // DESC_SIZE, chain, budget, may_map, top=False)
