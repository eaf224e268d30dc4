"""The VIRTIO_PCI_CAP_PCI_CFG window with a real guest: Linux finds the cap on the device's
capability list (QEMU passes config space through vfio-user to libvfio-user, which hands the
cap to our callback), and the guest itself uses the window through sysfs config space: cap.bar,
cap.offset, cap.length, then pci_cfg_data. Reads equal what the BAR says (the MAC, num_queues,
queue_size), a write through it reaches common cfg (queue_select), a window with length 3 reads
0 and is refused; virtio_net keeps working all along."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from harness.testbed import SHELL_CMDLINE, Testbed, TestbedConfig

from .conftest import need_root

pytestmark = pytest.mark.vm

#: Busybox sh: walk the cap list of the virtio-net function (1af4:1041) in sysfs config space,
#: then use the PCI_CFG cap's window. Offsets in octal for printf: 022 = 0x12 num_queues,
#: 026 = 0x16 queue_select, 030 = 0x18 queue_size, 040 00 = 0x2000 the device config (MAC).
SCRIPT = r"""
for d in /sys/bus/pci/devices/*; do [ "$(cat $d/device)" = 0x1041 ] && D=$d; done
cfg=$D/config
rd() { dd if=$cfg bs=1 skip=$1 count=$2 2>/dev/null | od -An -tx1 | tr -d ' \n'; }
rdw() { dd if=$cfg bs=$2 skip=$(($1 / $2)) count=1 2>/dev/null | od -An -tx1 | tr -d ' \n'; }
wr() { printf "$2" | dd of=$cfg bs=${3:-1} seek=$(($1 / ${3:-1})) conv=notrunc 2>/dev/null; }
p=$((0x$(rd 52 1))); C=0; types=
while [ $p -ne 0 ]; do
  t=$(rd $((p + 3)) 1)
  [ "$(rd $p 1)" = 09 ] && types="$types$t," && [ "$t" = 05 ] && C=$p
  p=$((0x$(rd $((p + 1)) 1)))
done
echo "types=$types"
[ $C -ne 0 ] || exit 1
echo "cap_len=$(rd $((C + 2)) 1)"
wr $((C + 4)) '\000'
wr $((C + 8)) '\000\040\000\000\004\000\000\000'
echo "mac=$(rdw $((C + 16)) 4)"
wr $((C + 8)) '\022\000\000\000\002\000\000\000'
echo "num_queues=$(rdw $((C + 16)) 2)"
wr $((C + 8)) '\026\000\000\000\002\000\000\000'
wr $((C + 16)) '\005\000' 2
wr $((C + 8)) '\030\000\000\000\002\000\000\000'
echo "size_absent=$(rdw $((C + 16)) 2)"
wr $((C + 8)) '\026\000\000\000\002\000\000\000'
wr $((C + 16)) '\000\000' 2
wr $((C + 8)) '\030\000\000\000\002\000\000\000'
echo "size_q0=$(rdw $((C + 16)) 2)"
wr $((C + 12)) '\003\000\000\000'
echo "bad=$(rdw $((C + 16)) 4)"
"""


@pytest.fixture(scope="module")
def testbed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Testbed]:
    need_root()
    cfg = TestbedConfig(console="socket", cmdline=SHELL_CMDLINE, peers=None)
    with Testbed(cfg, tmp_path_factory.mktemp("pcicfg")) as tb:
        tb.wait_shell(120)
        yield tb


def test_the_guest_finds_the_cap_and_reaches_bar0_through_the_window(testbed: Testbed) -> None:
    tb = testbed
    r = tb.guest.run(SCRIPT, timeout=60)
    assert r.returncode == 0, r.text
    got = dict(line.split("=", 1) for line in r.text.split() if "=" in line)
    # COMMON, NOTIFY, ISR, DEVICE, PCI_CFG: Linux walks the list to our last cap.
    assert got["types"] == "01,02,03,04,05,", r.text
    assert got["cap_len"] == "14"  # 20 bytes: virtio_pci_cap + pci_cfg_data[4]
    assert got["mac"] == "52540012"  # the first 4 bytes of the device config
    assert got["num_queues"] == "0200"  # rx, tx (little endian)
    assert got["size_absent"] == "0000" and got["size_q0"] == "0001"  # 256: the write landed
    assert got["bad"] == "00000000"
    stats = tb.device.stats()
    assert stats["pci_cfg"] == {"reads": 4, "writes": 2, "refused": 1}, stats["pci_cfg"]
    dev = stats["device"]
    assert isinstance(dev, dict) and dev["bad_accesses"] == 0 and not dev["needs_reset"]
    assert tb.guest.run("ping -c 1 -W 2 198.18.0.1", timeout=15).returncode == 0
