"""The cpio writer is valid newc, deterministic and rootless; the guest tree has what init needs."""

from __future__ import annotations

import gzip
import lzma
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from harness.guest import initramfs
from harness.guest.initramfs import Archive, build_archive, parse_cpio, write_image

REPO = Path(__file__).resolve().parents[2]


def _inputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "busybox").write_bytes(b"\x7fELF fake busybox")
    (tmp_path / "init").write_bytes(b"#!/bin/sh\necho hi\n")
    (tmp_path / "failover.ko").write_bytes(b"plain module")
    (tmp_path / "net_failover.ko.xz").write_bytes(lzma.compress(b"xz module"))
    (tmp_path / "virtio_net.ko.gz").write_bytes(gzip.compress(b"gz module"))
    (tmp_path / "hnet").write_bytes(b"\x7fELF prog")
    return {
        "failover": tmp_path / "failover.ko",
        "net_failover": tmp_path / "net_failover.ko.xz",
        "virtio_net": tmp_path / "virtio_net.ko.gz",
    }


def _archive(tmp_path: Path) -> Archive:
    modules = _inputs(tmp_path)
    return build_archive(
        busybox=tmp_path / "busybox",
        init=tmp_path / "init",
        modules=modules,
        programs={"hnet": tmp_path / "hnet"},
    )


def test_tree_contents(tmp_path: Path) -> None:
    entries = {e.path: e for e in parse_cpio(_archive(tmp_path).to_cpio())}
    assert entries["init"].data.startswith(b"#!/bin/sh") and entries["init"].mode & 0o111
    assert stat.S_ISCHR(entries["dev/console"].mode) and entries["dev/console"].rdev == (5, 1)
    assert stat.S_ISLNK(entries["bin/sh"].mode) and entries["bin/sh"].data == b"busybox"
    for applet in ("ip", "ping", "insmod", "mount", "poweroff", "usleep", "sleep", "cat"):
        assert entries[f"bin/{applet}"].data == b"busybox"
    assert entries["lib/modules/failover.ko"].data == b"plain module"
    assert entries["lib/modules/net_failover.ko"].data == b"xz module"
    assert entries["lib/modules/virtio_net.ko"].data == b"gz module"
    assert entries["bin/hnet"].mode == stat.S_IFREG | 0o755
    assert stat.S_ISDIR(entries["lib"].mode)  # implicit parents exist


def test_parents_precede_children_and_order_is_sorted(tmp_path: Path) -> None:
    paths = [e.path for e in parse_cpio(_archive(tmp_path).to_cpio())]
    assert paths == sorted(paths)
    seen: set[str] = set()
    for p in paths:
        parent = p.rpartition("/")[0]
        assert not parent or parent in seen
        seen.add(p)


def test_deterministic_and_compressed(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    one = write_image(_archive(a), a / "i.cpio.gz")
    two = write_image(_archive(b), b / "i.cpio.gz")
    assert one.read_bytes() == two.read_bytes()
    assert one.read_bytes()[:2] == b"\x1f\x8b"
    raw = write_image(_archive(a), a / "i.cpio", compress=False).read_bytes()
    assert gzip.decompress(one.read_bytes()) == raw
    assert raw.startswith(b"070701") and len(raw) % 4 == 0


def test_headers_rootless() -> None:
    a = Archive()
    a.add_file("etc/x", b"12345", 0o600)
    raw = a.to_cpio()
    pos, seen = 0, 0
    while raw[pos : pos + 6] == b"070701":
        fields = [int(raw[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        assert fields[2] == fields[3] == fields[5] == 0  # uid, gid, mtime
        namesize, filesize = fields[11], fields[6]
        pos += 110 + namesize
        pos += -pos % 4 + filesize
        pos += -pos % 4
        seen += 1
    assert seen == 3 and pos == len(raw)  # etc, etc/x, trailer


def test_missing_module_is_an_error(tmp_path: Path) -> None:
    modules = _inputs(tmp_path)
    del modules["virtio_net"]
    with pytest.raises(ValueError, match="virtio_net"):
        build_archive(busybox=tmp_path / "busybox", init=tmp_path / "init", modules=modules)


def test_bad_paths_rejected() -> None:
    with pytest.raises(ValueError):
        Archive().add_file("../escape", b"")


@pytest.mark.skipif(shutil.which("cpio") is None, reason="cpio(1) not installed")
def test_gnu_cpio_reads_it(tmp_path: Path) -> None:
    raw = _archive(tmp_path).to_cpio()
    listing = subprocess.run(["cpio", "-it", "--quiet"], input=raw, capture_output=True, check=True)
    names = listing.stdout.decode().split()
    assert "init" in names and "dev/console" in names and "bin/busybox" in names


def test_init_script_is_valid_sh() -> None:
    shell = shutil.which("sh")
    if shell is None:
        pytest.skip("no sh to syntax-check guest/init")
    subprocess.run([shell, "-n", str(REPO / "guest" / "init")], check=True)


def test_applet_list_has_what_init_uses() -> None:
    init = (REPO / "guest" / "init").read_text()
    for applet in ("ip", "ping", "insmod", "usleep", "poweroff", "readlink", "sed", "tr", "head"):
        assert applet in initramfs.APPLETS
        assert applet in init
