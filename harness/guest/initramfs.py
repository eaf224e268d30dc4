"""Write the guest initramfs: a rootless, deterministic newc cpio archive, optionally gzipped.

Every entry gets uid/gid/mtime 0 and inode numbers in path order, and parent directories are
created implicitly, so identical inputs always give identical bytes (cacheable, diffable), and
no root privileges are needed for device nodes or ownership.
"""

from __future__ import annotations

import gzip
import io
import lzma
import os
import shutil
import stat
import subprocess
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

NEWC_MAGIC = b"070701"
TRAILER = "TRAILER!!!"

# Applets init and the tests use; busybox dispatches on argv[0], so symlinks suffice.
APPLETS = (
    "sh", "ash", "cat", "echo", "printf", "ls", "mkdir", "mount", "umount", "insmod", "lsmod",
    "modprobe", "rmmod", "ip", "ping", "nc", "sleep", "usleep", "poweroff", "reboot", "halt",
    "sed", "grep", "head", "tail", "tr", "cut", "wc", "awk", "dmesg", "readlink", "uname",
    "sync", "dd", "sha256sum", "hexdump", "xxd", "timeout", "setsid", "cttyhack", "ps", "kill",
    "ifconfig", "route", "udhcpc", "sysctl", "date", "seq", "test", "[", "true", "false",
    "basename", "dirname", "stat", "env", "time", "vi", "less", "find", "xargs", "uptime",
)  # fmt: skip

# Modules in the order insmod must load them (virtio_net depends on net_failover -> failover).
MODULE_ORDER = ("failover", "net_failover", "virtio_net")


@dataclass(frozen=True)
class Entry:
    """One archive member; ``data`` is file content or a symlink target."""

    path: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _norm(path: str) -> str:
    p = str(PurePosixPath("/", path)).lstrip("/")
    if not p or p.startswith(".."):
        raise ValueError(f"bad archive path {path!r}")
    return p


class Archive:
    """An in-memory file tree that serialises to newc cpio."""

    def __init__(self) -> None:
        self._entries: dict[str, Entry] = {}

    def _add(self, entry: Entry) -> None:
        path = _norm(entry.path)
        parent = PurePosixPath(path).parent
        while str(parent) not in (".", ""):
            self._entries.setdefault(str(parent), Entry(str(parent), stat.S_IFDIR | 0o755))
            parent = parent.parent
        self._entries[path] = Entry(path, entry.mode, entry.data, entry.rdev)

    def add_dir(self, path: str, perm: int = 0o755) -> None:
        self._add(Entry(path, stat.S_IFDIR | perm))

    def add_file(self, path: str, data: bytes, perm: int = 0o644) -> None:
        self._add(Entry(path, stat.S_IFREG | perm, data))

    def add_symlink(self, path: str, target: str) -> None:
        self._add(Entry(path, stat.S_IFLNK | 0o777, target.encode()))

    def add_chardev(self, path: str, major: int, minor: int, perm: int = 0o600) -> None:
        self._add(Entry(path, stat.S_IFCHR | perm, rdev=(major, minor)))

    def paths(self) -> list[str]:
        return sorted(self._entries)

    def entry(self, path: str) -> Entry:
        return self._entries[_norm(path)]

    def to_cpio(self) -> bytes:
        """Sorted order puts every directory before its contents, as the kernel needs."""
        out = io.BytesIO()
        for ino, path in enumerate(sorted(self._entries), start=1):
            _write_member(out, self._entries[path], ino)
        _write_member(out, Entry(TRAILER, 0), 0)
        return out.getvalue()


def _pad4(out: io.BytesIO) -> None:
    out.write(b"\0" * (-out.tell() % 4))


def _write_member(out: io.BytesIO, e: Entry, ino: int) -> None:
    name = e.path.encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(e.mode) else 1
    fields = (ino, e.mode, 0, 0, nlink, 0, len(e.data), 0, 0, e.rdev[0], e.rdev[1], len(name), 0)
    out.write(NEWC_MAGIC + b"".join(b"%08X" % f for f in fields))
    out.write(name)
    _pad4(out)
    out.write(e.data)
    _pad4(out)


def parse_cpio(blob: bytes) -> list[Entry]:
    """Read a newc archive back (used by tests and for inspecting images)."""
    if blob[:2] == b"\x1f\x8b":
        blob = gzip.decompress(blob)
    entries: list[Entry] = []
    pos = 0
    while True:
        if blob[pos : pos + 6] != NEWC_MAGIC:
            raise ValueError(f"bad cpio magic at {pos}")
        f = [int(blob[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i in range(13)]
        namesize, filesize = f[11], f[6]
        pos += 110
        name = blob[pos : pos + namesize - 1].decode()
        pos += namesize + (-(pos + namesize) % 4)
        data = blob[pos : pos + filesize]
        pos += filesize + (-(pos + filesize) % 4)
        if name == TRAILER:
            return entries
        entries.append(Entry(name, f[1], data, (f[9], f[10])))


def unzstd(data: bytes, what: str) -> bytes:
    """zstd frames unpacked by the zstd command (Python 3.11 has no zstd module); ValueError
    naming `what` when the command is missing or refuses them."""
    if shutil.which("zstd") is None:
        raise ValueError(f"{what} is zstd-compressed and the zstd command is missing "
                         "(apt-get install zstd; make deps installs it)")
    r = subprocess.run(["zstd", "-dcq"], input=data, capture_output=True, check=False)
    if r.returncode != 0:
        raise ValueError(f"zstd could not unpack {what}: {r.stderr.decode(errors='replace')}")
    return r.stdout


def read_module(path: Path) -> bytes:
    """Module bytes, decompressing .ko.xz/.ko.gz/.ko.zst because busybox insmod takes plain
    ELF; ValueError naming the file when it does not unpack."""
    raw = path.read_bytes()
    try:
        if path.name.endswith(".xz"):
            return lzma.decompress(raw)
        if path.name.endswith(".gz"):
            return gzip.decompress(raw)
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise ValueError(f"{path} does not unpack: {exc}") from None
    if path.name.endswith(".zst"):
        return unzstd(raw, str(path))
    return raw


def build_archive(
    *,
    busybox: Path,
    init: Path,
    modules: Mapping[str, Path],
    programs: Mapping[str, Path] | None = None,
    applets: Iterable[str] = APPLETS,
    files: Mapping[str, Path] | None = None,
    require: Iterable[str] = MODULE_ORDER,
) -> Archive:
    """The guest tree: /bin/busybox + applet links, /init, /lib/modules/<name>.ko, /bin/<prog>.

    ``modules`` is in load order (dependencies first); /lib/modules/load-order lists it for
    /init. ``files`` maps archive paths to host files (scripts, the user's own additions).
    ``require`` names modules that must be present (empty when the kernel builds them in).
    """
    missing = [m for m in require if m not in modules]
    if missing:
        raise ValueError(f"modules missing from the environment: {', '.join(missing)}")
    a = Archive()
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "tmp", "run", "root"):
        a.add_dir(d)
    # The kernel opens /dev/console for init before devtmpfs is mounted, so it must exist here.
    a.add_chardev("dev/console", 5, 1)
    a.add_chardev("dev/null", 1, 3, 0o666)
    a.add_file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in applets:
        a.add_symlink(f"bin/{applet}", "busybox")
    a.add_file("init", init.read_bytes(), 0o755)
    a.add_dir("lib/modules")
    for name, path in sorted(modules.items()):
        a.add_file(f"lib/modules/{name}.ko", read_module(Path(path)))
    a.add_file("lib/modules/load-order", "".join(f"{m}\n" for m in modules).encode())
    for name, path in sorted((programs or {}).items()):
        a.add_file(f"bin/{name}", Path(path).read_bytes(), 0o755)
    for dest, src in sorted((files or {}).items()):
        mode = 0o755 if os.access(src, os.X_OK) else 0o644
        a.add_file(dest, Path(src).read_bytes(), mode)
    return a


def write_image(archive: Archive, out: Path, *, compress: bool = True) -> Path:
    """Write atomically (tmp + rename) so a concurrent reader never sees half an image."""
    data = archive.to_cpio()
    if compress:
        buf = io.BytesIO()
        # mtime=0 and no file name keep the gzip header deterministic too.
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
            gz.write(data)
        data = buf.getvalue()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    tmp.replace(out)
    return out
