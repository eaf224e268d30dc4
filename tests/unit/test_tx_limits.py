"""TX limits: a frame longer than any Ethernet frame can be is completed, dropped and counted."""

from __future__ import annotations

from harness.testing.mockdriver import net_rig

HDR = bytes(12)


def test_tx_frame_longer_than_any_ethernet_frame_is_dropped_and_counted() -> None:
    r = net_rig()
    big = HDR + bytes(65535 + 18 + 1)  # one byte past a 64 KiB packet with its headers
    r.tx.add([big[:40000], big[40000:]])
    r.tx.add([HDR + bytes(65535 + 18)])  # the largest frame there can be: delivered
    r.tx.kick()
    r.device.process()
    assert [len(f) for f in r.backend.tx] == [12 + 65535 + 18]
    assert sorted(n for _, n in r.tx.get_used()) == [0, 0]
    stats = r.device.stats()
    tx0 = stats["tx0"]
    assert isinstance(tx0, dict)
    assert tx0["drops"] == 1 and stats["oversize_drops"] == 1
