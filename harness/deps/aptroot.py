"""Private APT root: trixie(-backports) config, index updates, pinned .deb and source downloads.

Never touches the system's sources or package state: own Dir::State (empty status file), Dir::Cache
and Dir::Etc::SourceList, rendered from the templates in qemu/apt/.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from harness.deps.common import Context, DepsError, log, run
from harness.deps.pins import Pin, debian_version_compare, find_deb, verify_sha256

SYSTEM_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")


class AptRoot:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.root = ctx.cache / "apt"
        self.conf = self.root / "apt.conf"
        self._updated = False

    @property
    def env(self) -> dict[str, str]:
        return {"APT_CONFIG": str(self.conf), "LC_ALL": "C"}

    def keyring(self) -> Path:
        override = os.environ.get("HARNESS_APT_KEYRING")
        if override:
            return Path(override)
        if not SYSTEM_KEYRING.exists():
            raise DepsError(
                f"{SYSTEM_KEYRING} is missing: install the `debian-archive-keyring` package "
                "(or set HARNESS_APT_KEYRING to a keyring that signs Debian trixie)"
            )
        return SYSTEM_KEYRING

    def configure(self) -> None:
        """Render the config; idempotent (rewrites only when the content changes)."""
        if shutil.which("apt-get") is None:
            raise DepsError("apt-get is needed for the private APT root (Debian-like host)")
        for d in (
            "state/lists/partial",
            "cache/archives/partial",
            "etc/sources.list.d",
            "etc/preferences.d",
        ):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        status = self.root / "state" / "status"
        if not status.exists():
            status.write_text("")  # empty: apt resolves the full dependency closure
        tpl = self.ctx.apt_templates
        _write_if_changed(
            self.conf, (tpl / "apt.conf.in").read_text().replace("@ROOT@", str(self.root))
        )
        _write_if_changed(
            self.root / "etc" / "sources.list",
            (tpl / "sources.list.in").read_text().replace("@KEYRING@", str(self.keyring())),
        )

    def has_lists(self) -> bool:
        return any((self.root / "state" / "lists").glob("*_Packages*"))

    def update(self, *, force: bool = False) -> None:
        if self._updated or (self.has_lists() and not force):
            return
        if self.ctx.check:
            raise DepsError("the private APT root has no package lists (run without --check)")
        log("apt-get update (private root: trixie, trixie-backports)")
        cp = run(["apt-get", "update"], env=self.env, check=False)
        out = cp.stdout or ""
        if (
            cp.returncode != 0
            or "NO_PUBKEY" in out
            or re.search(r"^(W|E): .*(signature|Release)", out, re.M)
        ):
            raise DepsError(
                "apt-get update in the private root failed. If the message is about signatures "
                f"(NO_PUBKEY), {self.keyring()} does not know trixie's keys: install a newer "
                "debian-archive-keyring (e.g. from bookworm-backports) or point "
                "HARNESS_APT_KEYRING "
                f"at a keyring that does. Output:\n{out[-2000:]}"
            )
        self._updated = True

    def available_versions(self, name: str) -> list[str]:
        cp = run(["apt-cache", "madison", name], env=self.env, check=False)
        versions = []
        for line in (cp.stdout or "").splitlines():
            parts = [p.strip() for p in line.split("|")]
            if len(parts) >= 3 and parts[0] == name and "Sources" not in parts[2]:
                versions.append(parts[1])
        return sorted(set(versions), key=_VersionKey)

    def gone_error(self, pin: Pin, lock: Path) -> DepsError:
        versions = self.available_versions(pin.name)
        newer = [v for v in versions if debian_version_compare(v, pin.version) > 0]
        cand = f"newest candidate: {pin.name}={versions[-1]}" if versions else "no version offered"
        return DepsError(
            f"pinned {pin.spec()} is no longer offered by the registry ({cand}"
            f"{'; newer: ' + ', '.join(newer) if newer else ''}). Not taking it silently: "
            f"review and update {lock} (python3 -m harness.deps --relock qemu regenerates the "
            "QEMU lock)"
        )

    def download_debs(
        self, pins: list[Pin], dest: Path, lock: Path, *, system: bool = False
    ) -> None:
        """Fetch the pinned .debs missing from dest (apt-get download name=version), verify all."""
        dest.mkdir(parents=True, exist_ok=True)
        missing = [p for p in pins if find_deb(dest, p) is None]
        if missing:
            if self.ctx.check:
                raise DepsError(
                    f"{len(missing)} pinned .deb(s) not in {dest}, e.g. {missing[0].spec()}"
                )
            env = {"LC_ALL": "C"} if system else self.env
            if not system:
                self.configure()
                self.update()
            cp = run(
                ["apt-get", "download", *[p.spec() for p in missing]],
                cwd=dest,
                env=env,
                check=False,
            )
            if cp.returncode != 0 and not system and not self._updated:
                self.update(force=True)  # stale lists? one refresh, then retry
                cp = run(
                    ["apt-get", "download", *[p.spec() for p in missing]],
                    cwd=dest,
                    env=env,
                    check=False,
                )
            if cp.returncode != 0:
                for p in missing:
                    if f"'{p.version}' for '{p.name}' was not found" in (cp.stdout or ""):
                        if system:
                            raise _system_gone(p, lock)
                        raise self.gone_error(p, lock)
                raise DepsError(f"apt-get download failed:\n{(cp.stdout or '')[-2000:]}")
        for p in pins:
            deb = find_deb(dest, p)
            if deb is None:
                raise DepsError(f"{p.spec()} was not downloaded into {dest}")
            verify_sha256(deb, p.sha256)

    def download_source_file(self, pin: Pin, dest: Path, lock: Path) -> Path:
        """Fetch one file of a source package (pin.file) with apt-get source --download-only."""
        assert pin.file
        target = dest / pin.file
        if not target.exists():
            if self.ctx.check:
                raise DepsError(f"{target} is missing")
            self.configure()
            self.update()
            dest.mkdir(parents=True, exist_ok=True)
            cp = run(
                ["apt-get", "source", "--download-only", pin.spec()],
                cwd=dest,
                env=self.env,
                check=False,
            )
            if cp.returncode != 0:
                if "Unable to find a source package" in (cp.stdout or "") or "not found" in (
                    cp.stdout or ""
                ):
                    raise self.gone_error(pin, lock)
                raise DepsError(f"apt-get source failed:\n{(cp.stdout or '')[-2000:]}")
        verify_sha256(target, pin.sha256)
        return target


def _system_gone(pin: Pin, lock: Path) -> DepsError:
    cp = run(["apt-cache", "policy", pin.name], env={"LC_ALL": "C"}, check=False)
    m = re.search(r"Candidate: (\S+)", cp.stdout or "")
    cand = m.group(1) if m else "none"
    return DepsError(
        f"pinned {pin.spec()} is not offered by the system's APT sources (candidate: {cand}). "
        f"Not taking it silently: review and update {lock}"
    )


class _VersionKey:
    def __init__(self, v: str) -> None:
        self.v = v

    def __lt__(self, other: _VersionKey) -> bool:
        return debian_version_compare(self.v, other.v) < 0


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
