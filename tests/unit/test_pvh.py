"""The PVH boot image: a bzImage's payload found, unpacked, checked for the PVH note, cached."""

from __future__ import annotations

import bz2
import gzip
import lzma
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness import paths
from harness.guest import pvh
from harness.guest.kernel import KernelError


def elf(note_name: bytes = b"Xen\0", note_type: int = 18) -> bytes:
    """A minimal ELF64 with one PT_NOTE segment holding a GNU note, then the given note."""
    def pad(b: bytes) -> bytes:
        return b + b"\0" * (-len(b) % 4)

    def note(name: bytes, ntype: int, desc: bytes) -> bytes:
        return (len(name).to_bytes(4, "little") + len(desc).to_bytes(4, "little")
                + ntype.to_bytes(4, "little") + pad(name) + pad(desc))
    notes = note(b"GNU\0", 3, b"\xaa" * 20) + note(note_name, note_type, b"\0\0\x20\0")
    ident = b"\x7fELF\x02\x01\x01" + b"\0" * 9
    header = bytearray(ident + b"\0" * 48)
    header[0x20:0x28] = (64).to_bytes(8, "little")          # e_phoff
    header[0x36:0x38] = (56).to_bytes(2, "little")          # e_phentsize
    header[0x38:0x3A] = (1).to_bytes(2, "little")           # e_phnum
    ph = bytearray(56)
    ph[0:4] = (4).to_bytes(4, "little")                     # PT_NOTE
    ph[8:16] = (120).to_bytes(8, "little")                  # p_offset
    ph[32:40] = len(notes).to_bytes(8, "little")            # p_filesz
    return bytes(header) + bytes(ph) + notes + b"kernel text" * 100


def bzimage(blob: bytes, *, version: int = 0x20F, setup_sects: int = 3) -> bytes:
    """A bzImage-shaped file: setup sectors, then the protected-mode part holding `blob`."""
    head = bytearray((setup_sects + 1) * 512)
    head[0x1F1] = setup_sects
    head[0x202:0x206] = b"HdrS"
    head[0x206:0x208] = version.to_bytes(2, "little")
    head[0x248:0x24C] = (100).to_bytes(4, "little")         # payload_offset
    head[0x24C:0x250] = len(blob).to_bytes(4, "little")     # payload_length
    return bytes(head) + b"\x90" * 100 + blob + b"trailer"


def with_size(stream: bytes, raw: bytes) -> bytes:
    """What the kernel's build stores: the stream, then the unpacked size (4 bytes, LE)."""
    return stream + len(raw).to_bytes(4, "little")


@pytest.mark.parametrize("pack", [
    lambda raw: gzip.compress(raw),
    lambda raw: with_size(bz2.compress(raw), raw),
    lambda raw: with_size(lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32), raw),
    lambda raw: with_size(lzma.compress(raw, format=lzma.FORMAT_ALONE), raw),
], ids=["gzip", "bzip2", "xz", "lzma"])
def test_each_stdlib_format_unpacks_to_the_same_elf(pack: object) -> None:
    raw = elf()
    assert pvh.unpack(bzimage(pack(raw))) == raw  # type: ignore[operator]


@pytest.mark.skipif(shutil.which("zstd") is None, reason="no zstd command (make deps installs it)")
def test_zstd_goes_through_the_zstd_command_without_the_size_bytes() -> None:
    raw = elf()
    stream = subprocess.run(["zstd", "-c", "-q"], input=raw, capture_output=True,
                            check=True).stdout
    assert pvh.unpack(bzimage(with_size(stream, raw))) == raw


def test_a_truncated_stream_is_refused_not_half_booted() -> None:
    stream = gzip.compress(elf())
    with pytest.raises(pvh.BootError, match="truncated"):
        pvh.unpack(bzimage(stream[: len(stream) // 2]))


def test_the_payload_is_where_the_setup_header_says() -> None:
    blob = gzip.compress(elf())
    assert pvh.payload(bzimage(blob, setup_sects=7)) == blob
    zero = bytearray(bzimage(blob, setup_sects=4))
    zero[0x1F1] = 0  # 0 means 4, as the boot protocol says
    assert pvh.payload(bytes(zero)) == blob


@pytest.mark.parametrize("image,why", [
    (b"\0" * 4096, "no HdrS"),
    (bzimage(b"x" * 10, version=0x207), "2.7 has no payload"),
    (bzimage(b"x" * 10)[:-40], "outside the file"),
    (bzimage(b"\x02\x21\x4c\x18" + b"\0" * 20), "LZ4 or LZO"),
    (bzimage(b"????" + b"\0" * 20), "not recognised"),
    (bzimage(gzip.compress(b"not an elf")), "did not unpack to an ELF"),
    (bzimage(gzip.compress(elf(note_type=17))), "no PVH entry"),
    (bzimage(gzip.compress(elf(note_name=b"GNU\0"))), "no PVH entry"),
])
def test_what_cannot_boot_through_pvh_is_named(image: bytes, why: str) -> None:
    with pytest.raises(pvh.BootError, match=why):
        pvh.unpack(image)


def test_a_boot_error_is_a_kernel_error_so_the_commands_report_it() -> None:
    assert issubclass(pvh.BootError, KernelError)


def test_the_note_is_found_only_in_a_64_bit_little_endian_elf() -> None:
    assert pvh.has_pvh_note(elf())
    assert not pvh.has_pvh_note(b"\x7fELF\x01" + elf()[5:])  # 32-bit
    assert not pvh.has_pvh_note(elf()[:90])  # header cut: no crash, no note


def test_the_cache_unpacks_once_and_keeps_the_most_recently_used(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    images = []
    for i in range(pvh.KEEP + 1):
        p = tmp_path / f"bzImage{i}"
        p.write_bytes(bzimage(gzip.compress(elf() + bytes([i]))))
        images.append(p)
    cache = tmp_path / "cache"
    made = [pvh.cached_vmlinux(p, cache) for p in images[:pvh.KEEP]]
    assert made[0].read_bytes() == elf() + b"\0"
    for age, path in enumerate(made):  # made[0] the oldest
        stamp = time.time() - 3600 + age
        os.utime(path, (stamp, stamp))

    def no_unpack(_: bytes) -> bytes:
        raise AssertionError("unpacked again")
    monkeypatch.setattr(pvh, "unpack", no_unpack)
    assert pvh.cached_vmlinux(images[0], cache) == made[0]  # a hit: now the most recent
    monkeypatch.undo()
    newest = pvh.cached_vmlinux(images[-1], cache)  # one too many: the least recent goes
    assert set(cache.glob("*.vmlinux")) == {made[0], *made[2:], newest}
    assert not list(cache.glob("*.tmp*"))


def test_boot_image_modes(tmp_path: Path) -> None:
    good = tmp_path / "bzImage"
    good.write_bytes(bzimage(gzip.compress(elf())))
    bad = tmp_path / "old"
    bad.write_bytes(bzimage(gzip.compress(elf(note_type=17))))
    cache = tmp_path / "cache"
    b = pvh.boot_image(good, "auto", cache)
    assert (b.mode, b.path.parent) == ("pvh", cache)
    assert pvh.boot_image(good, "bzimage", cache) == pvh.BootImage(
        good, "bzimage", "asked for (--boot bzimage)")
    fallback = pvh.boot_image(bad, "auto", cache)
    assert (fallback.path, fallback.mode) == (bad, "bzimage")
    assert "no PVH entry" in fallback.reason
    with pytest.raises(pvh.BootError, match=r"--boot pvh: .*no PVH entry"):
        pvh.boot_image(bad, "pvh", cache)
    with pytest.raises(pvh.BootError, match="must be one of"):
        pvh.boot_image(good, "uefi", cache)


def test_the_pinned_kernel_boots_through_pvh(tmp_path: Path) -> None:
    try:
        env = paths.load_env()
    except paths.EnvError:
        pytest.skip("no env.json (make deps)")
    b = pvh.boot_image(Path(env.kernel), "pvh", tmp_path)
    assert b.mode == "pvh"
    assert b.path.stat().st_size > Path(env.kernel).stat().st_size


def test_without_the_zstd_command_auto_falls_back_and_says_why(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("harness.guest.initramfs.shutil.which", lambda _: None)
    image = tmp_path / "bzImage"
    image.write_bytes(bzimage(b"\x28\xb5\x2f\xfd" + b"\0" * 40))
    b = pvh.boot_image(image, "auto", tmp_path / "cache")
    assert (b.path, b.mode) == (image, "bzimage")
    assert "the payload is zstd-compressed and the zstd command is missing" in b.reason
    with pytest.raises(pvh.BootError, match="make deps installs it"):
        pvh.boot_image(image, "pvh", tmp_path / "cache")


@pytest.mark.skipif(shutil.which("zstd") is None, reason="no zstd command (make deps installs it)")
def test_a_payload_zstd_refuses_is_a_boot_error_naming_it() -> None:
    with pytest.raises(pvh.BootError, match="zstd could not unpack the payload"):
        pvh.unpack(bzimage(b"\x28\xb5\x2f\xfd" + b"\xff" * 40))


@pytest.mark.parametrize("magic", [b"\x1f\x8b\x08", b"BZh9", b"\xfd7zXZ\0", b"\x5d\0\0"],
                         ids=["gzip", "bzip2", "xz", "lzma"])
def test_a_corrupt_stream_is_a_boot_error_and_auto_falls_back(magic: bytes,
                                                               tmp_path: Path) -> None:
    image = bzimage(magic + bytes(range(256)) * 4)
    with pytest.raises(pvh.BootError, match="the payload does not unpack"):
        pvh.unpack(image)
    path = tmp_path / "bzImage"
    path.write_bytes(image)
    assert pvh.boot_image(path, "auto", tmp_path / "cache").mode == "bzimage"
