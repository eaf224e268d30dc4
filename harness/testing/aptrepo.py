"""A local, file-based APT repository built by tests: packages, suites, a sources.list for it.

So the drift policy of harness.deps is tested against a real `apt-get` resolving, simulating
and downloading, deterministically, without the live archive. Packages are built with
`dpkg-deb --build`; the index is a minimal dists/<suite>/{Release, main/binary-amd64/Packages}
(marked `trusted=yes` in the sources line: no signature to make).
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class FakeDeb:
    name: str
    version: str
    depends: str = ""
    #: path inside the package -> content (bytes) or a host file to copy
    files: dict[str, bytes | Path] = field(default_factory=dict)
    mode: int = 0o755


class AptRepo:
    """dists/<suite> trees under one root; `publish()` writes the indexes."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.suites: dict[str, list[Path]] = {}
        (root / "pool").mkdir(parents=True, exist_ok=True)

    def add(self, suite: str, deb: FakeDeb) -> Path:
        """Build the package into the pool and list it in suite."""
        build = self.root / "build" / f"{deb.name}_{deb.version}"
        shutil.rmtree(build, ignore_errors=True)
        (build / "DEBIAN").mkdir(parents=True)
        control = [f"Package: {deb.name}", f"Version: {deb.version}", "Architecture: amd64",
                   "Maintainer: harness tests <tests@example.invalid>",
                   f"Description: fake {deb.name} for harness.deps tests"]
        if deb.depends:
            control.append(f"Depends: {deb.depends}")
        (build / "DEBIAN" / "control").write_text("\n".join(control) + "\n")
        for rel, content in deb.files.items():
            target = build / rel.lstrip("/")
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, Path):
                shutil.copyfile(content, target)
            else:
                target.write_bytes(content)
            target.chmod(deb.mode)
        safe_version = deb.version.replace(":", "%3a")
        out = self.root / "pool" / f"{deb.name}_{safe_version}_amd64.deb"
        subprocess.run(["dpkg-deb", "--root-owner-group", "--build", "-Zgzip", str(build),
                        str(out)], check=True, capture_output=True)
        shutil.rmtree(build)
        self.suites.setdefault(suite, []).append(out)
        return out

    def publish(self) -> None:
        for suite, debs in self.suites.items():
            stanzas = []
            for deb in debs:
                fields = subprocess.run(["dpkg-deb", "-f", str(deb)], check=True,
                                        capture_output=True, text=True).stdout.strip()
                data = deb.read_bytes()
                stanzas.append(f"{fields}\nFilename: pool/{deb.name}\nSize: {len(data)}\n"
                               f"SHA256: {hashlib.sha256(data).hexdigest()}\n")
            d = self.root / "dists" / suite
            (d / "main" / "binary-amd64").mkdir(parents=True, exist_ok=True)
            packages = "\n".join(stanzas).encode()
            (d / "main" / "binary-amd64" / "Packages").write_bytes(packages)
            digest = hashlib.sha256(packages).hexdigest()
            (d / "Release").write_text(
                f"Suite: {suite}\nCodename: {suite}\nDate: Mon, 30 Nov 2026 00:00:00 UTC\n"
                "Architectures: amd64\nComponents: main\n"
                f"SHA256:\n {digest} {len(packages)} main/binary-amd64/Packages\n")

    def sources_list(self) -> str:
        return "".join(f"deb [trusted=yes] file:{self.root} {suite} main\n"
                       for suite in self.suites)

