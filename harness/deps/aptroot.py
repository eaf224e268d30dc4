"""Private APT root: trixie(-backports) config, index updates, package queries and downloads.

What to download (pins, drift) is harness.deps.resolve's business; this module is APT mechanics.

Never touches the system's sources or package state: own Dir::State (empty status file), Dir::Cache
and Dir::Etc::SourceList, rendered from the templates in qemu/apt/.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from harness.deps.common import Context, DepsError, log, run
from harness.deps.pins import debian_version_compare

SYSTEM_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
#: Private roots whose lists were refreshed by this process (each step makes its own AptRoot).
_REFRESHED: set[Path] = set()


class AptRoot:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.root = ctx.cache / "apt"
        self.conf = self.root / "apt.conf"

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
        if self.ctx.apt_sources is not None:
            # A mirror, or the tests' local file repository, instead of the public archive.
            sources = self.ctx.apt_sources.read_text()
        else:
            sources = (tpl / "sources.list.in").read_text().replace(
                "@KEYRING@", str(self.keyring())
            )
        _write_if_changed(self.root / "etc" / "sources.list", sources)

    def has_lists(self) -> bool:
        return any((self.root / "state" / "lists").glob("*_Packages*"))

    def update(self, *, force: bool = False) -> None:
        if self.root in _REFRESHED or (self.has_lists() and not force):
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
        _REFRESHED.add(self.root)

    def prepare(self, *, fresh: bool = False) -> None:
        """Config written and lists present; `fresh`: lists refreshed once in this process
        (before a download, so that a list from last week does not name files the archive
        has since replaced)."""
        self.configure()
        self.update(force=fresh)

    def _apt_env(self, system: bool) -> dict[str, str]:
        return {"LC_ALL": "C"} if system else self.env

    def offered(self, name: str, *, system: bool = False, suite: str | None = None
                ) -> list[str]:
        """Every version of a binary package the sources offer (from `suite` only, if
        given: e.g. trixie without trixie-backports), oldest first."""
        if not system:
            self.prepare()
        cp = run(["apt-cache", "madison", name], env=self._apt_env(system), check=False)
        versions = []
        for line in (cp.stdout or "").splitlines():
            parts = [p.strip() for p in line.split("|")]
            if (len(parts) >= 3 and parts[0] == name and "Sources" not in parts[2]
                    and (suite is None or f" {suite}/" in f" {parts[2]}")):
                versions.append(parts[1])
        return sorted(set(versions), key=_VersionKey)

    def field(self, name: str, version: str, key: str, *, system: bool = False) -> str:
        """One control field (e.g. Depends) of name=version from the package index."""
        cp = run(["apt-cache", "show", f"{name}={version}"], env=self._apt_env(system),
                 check=False)
        m = re.search(rf"^{re.escape(key)}: (.*)$", cp.stdout or "", re.M)
        return m.group(1) if m else ""

    def _retry_after_update(self, argv: list[str], *, cwd: Path | None, system: bool
                            ) -> tuple[int, str]:
        """Run an apt command; if it fails, refresh the private lists once and retry."""
        env = self._apt_env(system)
        cp = run(argv, cwd=cwd, env=env, check=False)
        if cp.returncode != 0 and not system and self.root not in _REFRESHED:
            self.update(force=True)  # stale lists name files the archive no longer has
            cp = run(argv, cwd=cwd, env=env, check=False)
        return cp.returncode, cp.stdout or ""

    def download(self, specs: list[str], dest: Path, *, system: bool = False) -> None:
        """apt-get download name=version... into dest (APT checks each file against the
        sha256 in the signed index before it keeps it)."""
        if not specs:
            return
        if self.ctx.check:
            raise DepsError(f"{len(specs)} .deb(s) not in {dest}, e.g. {specs[0]}")
        dest.mkdir(parents=True, exist_ok=True)
        if not system:
            self.prepare(fresh=True)
        rc, out = self._retry_after_update(["apt-get", "download", *specs], cwd=dest,
                                           system=system)
        if rc != 0:
            raise DepsError(f"apt-get download {' '.join(specs)} failed:\n{out[-2000:]}")

    def closure(self, spec: str, release: str) -> list[tuple[str, str]]:
        """(name, version) of every package `apt-get install spec` would install into an
        empty root, preferring `release` (apt's own dependency resolution, simulated)."""
        self.prepare()
        cp = run(["apt-get", "install", "-s", "-y", "-t", release, spec], env=self.env,
                 check=False)
        if cp.returncode != 0:
            raise DepsError(f"APT cannot resolve {spec} from {release}:\n{cp.stdout[-2000:]}")
        return re.findall(r"^Inst (\S+) (?:\[\S+\] )?\((\S+) ", cp.stdout, re.M)

    def download_source(self, spec: str, dest: Path) -> str:
        """apt-get source --download-only spec into dest; returns APT's output."""
        if self.ctx.check:
            raise DepsError(f"the source of {spec} is not in {dest}")
        self.prepare(fresh=True)
        dest.mkdir(parents=True, exist_ok=True)
        rc, out = self._retry_after_update(["apt-get", "source", "--download-only", spec],
                                           cwd=dest, system=False)
        if rc != 0:
            raise DepsError(f"apt-get source {spec} failed:\n{out[-2000:]}")
        return out


class _VersionKey:
    def __init__(self, v: str) -> None:
        self.v = v

    def __lt__(self, other: _VersionKey) -> bool:
        return debian_version_compare(self.v, other.v) < 0


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)
