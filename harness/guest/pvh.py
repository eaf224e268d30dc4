"""Boot the kernel under test through its PVH entry: the bzImage's own vmlinux, unpacked once.

Under TCG a bzImage spends 2-3 s before the kernel prints its first line: firmware copies it
into guest memory and the kernel's decompressor, emulated instruction by instruction, unpacks
and relocates itself. A kernel built with CONFIG_PVH=y (Debian's, and most distributions')
also carries an entry point QEMU can start directly (the Xen PHYS32_ENTRY ELF note): give QEMU
the uncompressed ELF that the bzImage wraps, and the kernel starts at once. It is the same
kernel code, byte for byte; only the boot entry differs (no decompressor, so no KASLR). A
kernel developer chasing a decompressor or early-boot bug asks for the bzImage (``--boot
bzimage``); everyone else gets the faster boot.

The vmlinux is the bzImage's payload (boot protocol >= 2.08 says where it is), decompressed in
Python (gzip, bzip2, xz, lzma) or by the ``zstd`` command, checked to be an ELF with the PVH
note, and cached by the bzImage's SHA-256 under the harness cache (the few most recent kept).
"""

from __future__ import annotations

import bz2
import hashlib
import lzma
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

from harness.guest.initramfs import unzstd
from harness.guest.kernel import KernelError

#: --boot choices: auto (PVH when the kernel can, else the bzImage), pvh (or an error), bzimage.
BOOT_MODES = ("auto", "pvh", "bzimage")
#: Unpacked kernels kept in the cache (each is tens of MiB); older ones are removed.
KEEP = 4
_XEN_NOTE_NAME = b"Xen\0"
_XEN_ELFNOTE_PHYS32_ENTRY = 18
_PT_NOTE = 4


class BootError(KernelError):
    """--boot pvh was asked for and this kernel cannot boot that way; the message says why."""


@dataclass(frozen=True)
class BootImage:
    """What QEMU's -kernel gets, and how it was chosen (for the run's summary)."""

    path: Path
    mode: str  # "pvh" or "bzimage"
    reason: str


def payload(image: bytes) -> bytes:
    """The compressed kernel inside a bzImage (boot protocol 2.08+: payload_offset/length)."""
    if image[0x202:0x206] != b"HdrS":
        raise BootError("not an x86 bzImage (no HdrS magic)")
    version = int.from_bytes(image[0x206:0x208], "little")
    if version < 0x208:
        raise BootError(f"boot protocol {version >> 8}.{version & 0xff} has no payload fields")
    setup_sects = image[0x1F1] or 4
    offset = int.from_bytes(image[0x248:0x24C], "little")
    length = int.from_bytes(image[0x24C:0x250], "little")
    start = (setup_sects + 1) * 512 + offset
    if length == 0 or start + length > len(image):
        raise BootError("the setup header's payload lies outside the file")
    return image[start:start + length]


def _stream(d: zlib._Decompress | bz2.BZ2Decompressor | lzma.LZMADecompressor,
            blob: bytes) -> bytes:
    # One stream; what follows it is ignored: the kernel's build appends the uncompressed size
    # (4 bytes) after the stream for every format but gzip. A stream cut short is refused.
    try:
        out = d.decompress(blob)
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as exc:  # a corrupt stream
        raise BootError(f"the payload does not unpack: {exc}") from None
    if not d.eof:
        raise BootError("the payload's compressed stream is truncated")
    return out


def _zstd(blob: bytes) -> bytes:
    try:
        # The last 4 bytes are the appended size, not a zstd frame: the command would refuse
        # them.
        return unzstd(blob[:-4], "the payload")
    except ValueError as exc:
        raise BootError(str(exc)) from None


def decompress(blob: bytes) -> bytes:
    """The payload unpacked, by its magic; BootError for formats Python cannot read here."""
    if blob.startswith(b"\x1f\x8b"):
        return _stream(zlib.decompressobj(16 + zlib.MAX_WBITS), blob)
    if blob.startswith(b"BZh"):
        return _stream(bz2.BZ2Decompressor(), blob)
    if blob.startswith(b"\xfd7zXZ\0"):
        return _stream(lzma.LZMADecompressor(lzma.FORMAT_XZ), blob)
    if blob.startswith(b"\x5d\0\0"):
        return _stream(lzma.LZMADecompressor(lzma.FORMAT_ALONE), blob)
    if blob.startswith(b"\x28\xb5\x2f\xfd"):
        return _zstd(blob)
    if blob.startswith(b"\x02\x21\x4c\x18") or blob.startswith(b"\x89LZO"):
        raise BootError("the payload is LZ4 or LZO-compressed, which the harness cannot unpack")
    raise BootError("the payload's compression is not recognised")


def has_pvh_note(elf: bytes) -> bool:
    """Whether a 64-bit little-endian ELF carries Xen's PHYS32_ENTRY note (QEMU's PVH boot)."""
    if elf[:5] != b"\x7fELF\x02" or elf[5] != 1:
        return False
    phoff = int.from_bytes(elf[0x20:0x28], "little")
    phentsize = int.from_bytes(elf[0x36:0x38], "little")
    phnum = int.from_bytes(elf[0x38:0x3A], "little")
    for i in range(phnum):
        ph = elf[phoff + i * phentsize: phoff + (i + 1) * phentsize]
        if len(ph) < 0x38 or int.from_bytes(ph[0:4], "little") != _PT_NOTE:
            continue
        off = int.from_bytes(ph[8:16], "little")
        end = min(off + int.from_bytes(ph[32:40], "little"), len(elf))
        while off + 12 <= end:
            namesz, descsz, ntype = (int.from_bytes(elf[off + k:off + k + 4], "little")
                                     for k in (0, 4, 8))
            name = elf[off + 12:off + 12 + namesz]
            if name == _XEN_NOTE_NAME and ntype == _XEN_ELFNOTE_PHYS32_ENTRY:
                return True
            off += 12 + (namesz + 3) // 4 * 4 + (descsz + 3) // 4 * 4
    return False


def unpack(image: bytes) -> bytes:
    """The bzImage's vmlinux, checked bootable through PVH (BootError says why not)."""
    elf = decompress(payload(image))
    if not elf.startswith(b"\x7fELF"):
        raise BootError("the payload did not unpack to an ELF image")
    if not has_pvh_note(elf):
        raise BootError("the kernel has no PVH entry (built without CONFIG_PVH)")
    return elf


def _prune(folder: Path, keep: int) -> None:
    olds = sorted(folder.glob("*.vmlinux"), key=lambda p: p.stat().st_mtime, reverse=True)
    for old in olds[keep:]:
        old.unlink(missing_ok=True)


def cached_vmlinux(image: Path, cache: Path, keep: int = KEEP) -> Path:
    """The unpacked vmlinux of `image`, from the cache or made now (written atomically)."""
    data = image.read_bytes()
    out = cache / f"{hashlib.sha256(data).hexdigest()[:24]}.vmlinux"
    if out.is_file():
        out.touch()  # most recently used: pruned last
        return out
    elf = unpack(data)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(elf)
    os.replace(tmp, out)  # two runs unpacking at once: either file is the same
    _prune(cache, keep)
    return out


def boot_image(image: Path, mode: str, cache: Path) -> BootImage:
    """The -kernel for this run: the PVH vmlinux when asked for or possible, else the bzImage."""
    if mode not in BOOT_MODES:
        raise BootError(f"boot mode must be one of {', '.join(BOOT_MODES)}, not {mode!r}")
    if mode == "bzimage":
        return BootImage(image, "bzimage", "asked for (--boot bzimage)")
    try:
        path = cached_vmlinux(image, cache)
    except (BootError, OSError) as exc:
        if mode == "pvh":
            raise BootError(f"--boot pvh: {image}: {exc}") from None
        return BootImage(image, "bzimage", f"no PVH boot: {exc}")
    return BootImage(path, "pvh", f"PVH entry of the bzImage's vmlinux ({path.name})")
