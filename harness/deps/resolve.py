"""The drift policy: what to install when the package archive has moved on since a lock was written.

Debian serves only the current revision of a package in a suite, so exact pins of a library
closure break every fresh machine within days. The policy (docs/DESIGN.md, "Pins and drift"):

- What results depend on (QEMU, the guest kernel, busybox, libvfio-user's source) is pinned. If
  the pinned version is still offered it is taken and its sha256 checked against the lock. If it
  is gone, the newest candidate that satisfies the constraint is taken and the change is
  reported loudly (`Drift.matters`); only when nothing satisfies it does the install stop.
- The rest of a closure (glibc, openssl, zlib ...) is whatever APT resolves today. APT checks
  every .deb against the sha256 in the signed InRelease -> Packages chain, which is the integrity
  guarantee; a package whose version still equals the lock's must still match the lock's hash.
- What was really installed is recorded in a resolved manifest in the cache; with that manifest
  and its files present nothing is asked of the network (offline `make deps` works).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from harness.deps.aptroot import AptRoot
from harness.deps.common import DepsError, sha256_file, sha256_text, warn
from harness.deps.pins import Pin, find_deb, format_pins


@dataclass(frozen=True)
class Drift:
    """One difference between a lock and what was installed."""

    name: str
    pinned: str | None  # None: new in the closure
    taken: str | None  # None: no longer part of the closure
    #: The package is one results depend on (not just a library of the closure).
    matters: bool = False

    def __str__(self) -> str:
        if self.pinned is None:
            return f"{self.name} (new) {self.taken}"
        if self.taken is None:
            return f"{self.name} {self.pinned} (dropped)"
        return f"{self.name} {self.pinned} -> {self.taken}"


@dataclass(frozen=True)
class Resolved:
    """What one step installs: pins with the sha256 of the files really used, and the drift."""

    pins: list[Pin]
    drift: list[Drift]

    def by_name(self) -> dict[str, Pin]:
        return {p.name: p for p in self.pins}

    def to_json(self, lock_digest: str) -> str:
        return json.dumps({
            "lock": lock_digest,
            "pins": [[p.name, p.version, p.sha256] for p in self.pins],
            "drift": [[d.name, d.pinned, d.taken, d.matters] for d in self.drift],
        }, indent=1) + "\n"

    @classmethod
    def load(cls, path: Path, lock_digest: str) -> Resolved | None:
        """The manifest at path if it was resolved from this lock; else None."""
        try:
            data = json.loads(path.read_text())
            if data["lock"] != lock_digest:
                return None
            pins = [Pin(str(n), str(v), str(s)) for n, v, s in data["pins"]]
            drift = [Drift(str(n), p, t, bool(m)) for n, p, t, m in data["drift"]]
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return cls(pins, drift)

    def digest(self) -> str:
        return sha256_text(format_pins(self.pins))


def upstream(version: str) -> str:
    """The upstream part of a Debian version: 1:11.1.3+ds-1~bpo13+1 -> 11.1.3+ds."""
    v = version.split(":", 1)[-1]
    return v.rpartition("-")[0] if "-" in v else v


def drift_line(what: str, drift: list[Drift]) -> str:
    """The one warning line for a step whose archive moved."""
    loud = [d for d in drift if d.matters]
    libs = [d for d in drift if not d.matters]
    parts = []
    if loud:
        parts.append("PINNED VERSION GONE, newest acceptable taken: "
                     + ", ".join(map(str, loud)))
    if libs:
        parts.append(f"{len(libs)} package(s) moved since the lock (taken; APT verified them "
                     "against the signed index): " + ", ".join(map(str, libs)))
    return f"{what}: " + "; ".join(parts)


def report(what: str, resolved: Resolved) -> tuple[str, ...]:
    """Warn about a step's drift (every run, cached or not) and return it for env.json."""
    if not resolved.drift:
        return ()
    line = drift_line(what, resolved.drift)
    warn(line)
    return (line,)


def cached(dest: Path, pins: list[Pin]) -> bool:
    """Every pinned file is in dest with its pinned sha256 (no network needed)."""
    for p in pins:
        deb = find_deb(dest, p)
        if deb is None or sha256_file(deb) != p.sha256:
            return False
    return True


def check_files(dest: Path, pins: list[Pin]) -> None:
    """Raise unless every file of a resolved manifest is present and unchanged."""
    for p in pins:
        deb = find_deb(dest, p)
        if deb is None:
            raise DepsError(f"{p.spec()} is not in {dest}")
        actual = sha256_file(deb)
        if actual != p.sha256:
            raise DepsError(f"{deb} changed since it was installed (sha256 {actual}, recorded "
                            f"{p.sha256}): delete it and rerun")


def hashed(dest: Path, name: str, version: str, lock: dict[str, Pin]) -> Pin:
    deb = find_deb(dest, Pin(name, version, "0" * 64))
    if deb is None:
        raise DepsError(f"{name}={version} was not downloaded into {dest}")
    sha = sha256_file(deb)
    pinned = lock.get(name)
    if pinned is not None and pinned.version == version and pinned.sha256 != sha:
        raise DepsError(
            f"{deb.name}: same version as the lock but a different sha256 ({sha}, lock "
            f"{pinned.sha256}). The archive would not re-use a version for other content: "
            "check the mirror, delete the file and rerun")
    return Pin(name, version, sha)


def closure(apt: AptRoot, lock: list[Pin], root: str, release: str, dest: Path,
            acceptable: Callable[[str], bool], constraint: str) -> Resolved:
    """Resolve root's closure from `release`: root at its pinned version if offered, else the
    newest acceptable one; every other package at what APT resolves today."""
    by_name = {p.name: p for p in lock}
    if root not in by_name:
        raise DepsError(f"the lock pins no {root}")
    if cached(dest, lock):
        return Resolved(list(lock), [])
    apt.prepare(fresh=True)
    pinned = by_name[root].version
    offered = apt.offered(root)
    if pinned in offered:
        version = pinned
    else:
        ok = [v for v in offered if acceptable(v)]
        if not ok:
            raise DepsError(
                f"pinned {root}={pinned} is no longer offered and no offered version "
                f"({', '.join(offered) or 'none'}) satisfies {constraint}. Fix: point the "
                "sources at an archive that has one (HARNESS_APT_SOURCES), or install a "
                "distribution QEMU that satisfies it")
        version = ok[-1]
    spec = f"{root}={version}"
    members = apt.closure(spec, release)
    if not any(n == root for n, _ in members):
        raise DepsError(f"APT's resolution of {spec} does not contain {root}")
    missing = [f"{n}={v}" for n, v in members if find_deb(dest, Pin(n, v, "0" * 64)) is None]
    apt.download(missing, dest)
    pins = [hashed(dest, n, v, by_name) for n, v in members]
    drift = [Drift(p.name, by_name[p.name].version if p.name in by_name else None, p.version,
                   matters=p.name == root or p.name.startswith("qemu-"))
             for p in pins
             if p.name not in by_name or by_name[p.name].version != p.version]
    names = {p.name for p in pins}
    drift += [Drift(p.name, p.version, None) for p in lock if p.name not in names]
    return Resolved(pins, sorted(drift, key=lambda d: (not d.matters, d.name)))


def single(apt: AptRoot, pin: Pin, dest: Path, *, system: bool = False,
           matters: bool = True) -> tuple[Pin, Drift | None] | None:
    """One pinned package: the pin if offered (hash checked), else the newest version of the
    same package; None if the package is not offered at all."""
    if cached(dest, [pin]):
        return pin, None
    if not system:
        apt.prepare(fresh=True)  # what last week's lists offer may be gone today
    offered = apt.offered(pin.name, system=system)
    if not offered:
        return None
    version = pin.version if pin.version in offered else offered[-1]
    apt.download([f"{pin.name}={version}"], dest, system=system)
    got = hashed(dest, pin.name, version, {pin.name: pin})
    if version == pin.version:
        return got, None
    return got, Drift(pin.name, pin.version, version, matters=matters)

