"""Pins: parse `name version sha256 [file]` locks, verify sha256, compare (Debian) versions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

from harness.deps.common import DepsError, sha256_file

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Pin:
    name: str  # Debian package name (or source package)
    version: str  # full Debian version, epoch included
    sha256: str
    file: str | None = None  # explicit file name when it is not <name>_<version>_<arch>.deb

    def deb_glob(self) -> str:
        """Glob for the .deb apt saves for this pin (epoch colon is written as %3a)."""
        return f"{self.name}_{quote(self.version, safe='+~.-')}_*.deb".replace("%3A", "%3a")

    def spec(self) -> str:
        return f"{self.name}={self.version}"


def parse_pins(text: str, *, source: str = "<pins>") -> list[Pin]:
    """Parse a lock: one `name version sha256 [file]` per line, `#` starts a comment."""
    pins: list[Pin] = []
    seen: set[str] = set()
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) not in (3, 4):
            raise DepsError(
                f"{source}:{lineno}: expected `name version sha256 [file]`, got {raw!r}"
            )
        name, version, sha = fields[:3]
        if not _SHA_RE.match(sha):
            raise DepsError(f"{source}:{lineno}: {sha!r} is not a lowercase sha256 hex digest")
        if name in seen:
            raise DepsError(f"{source}:{lineno}: {name} pinned twice")
        seen.add(name)
        pins.append(Pin(name, version, sha, fields[3] if len(fields) == 4 else None))
    return pins


def load_pins(path: Path) -> list[Pin]:
    try:
        return parse_pins(path.read_text(), source=str(path))
    except FileNotFoundError:
        raise DepsError(f"pin file {path} is missing (it is part of the repository)") from None


def format_pins(pins: list[Pin], header: str = "") -> str:
    lines = [f"# {h}" if h else "#" for h in header.splitlines()]
    for p in sorted(pins, key=lambda p: p.name):
        lines.append(" ".join([p.name, p.version, p.sha256, *([p.file] if p.file else [])]))
    return "\n".join(lines) + "\n"


def verify_sha256(path: Path, expected: str) -> None:
    """Raise DepsError unless the file exists and has the expected sha256."""
    if not path.is_file():
        raise DepsError(f"{path} is missing")
    actual = sha256_file(path)
    if actual != expected:
        raise DepsError(
            f"sha256 mismatch for {path}: expected {expected}, got {actual}; "
            "the file was replaced or corrupted (delete it and rerun), or the pin is wrong"
        )


def find_deb(directory: Path, pin: Pin) -> Path | None:
    if pin.file:
        p = directory / pin.file
        return p if p.exists() else None
    hits = sorted(directory.glob(pin.deb_glob()))
    return hits[0] if hits else None


# --- versions ---------------------------------------------------------------------------------


def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _cmp_part(a: str, b: str) -> int:
    """dpkg's verrevcmp for one upstream or revision string."""
    i = j = 0
    while i < len(a) or j < len(b):
        first_diff = 0
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return -1 if ac < bc else 1
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return -1 if first_diff < 0 else 1
    return 0


def _split_deb(v: str) -> tuple[int, str, str]:
    epoch = 0
    if ":" in v:
        e, v = v.split(":", 1)
        epoch = int(e)
    upstream, _, revision = v.rpartition("-") if "-" in v else (v, "", "")
    return epoch, upstream, revision


def debian_version_compare(a: str, b: str) -> int:
    """Compare two Debian versions like `dpkg --compare-versions`: -1, 0 or 1."""
    ea, ua, ra = _split_deb(a)
    eb, ub, rb = _split_deb(b)
    if ea != eb:
        return -1 if ea < eb else 1
    return _cmp_part(ua, ub) or _cmp_part(ra, rb)


def version_tuple(text: str) -> tuple[int, ...]:
    """Leading dotted numbers of a version string: "11.1.3+ds" -> (11, 1, 3)."""
    m = re.match(r"\d+(?:\.\d+)*", text.strip())
    if not m:
        raise ValueError(f"no version number in {text!r}")
    return tuple(int(x) for x in m.group(0).split("."))


def version_at_least(text: str, minimum: tuple[int, ...]) -> bool:
    v = version_tuple(text)
    width = max(len(v), len(minimum))
    return v + (0,) * (width - len(v)) >= minimum + (0,) * (width - len(minimum))
