"""Extra guest kernels for the kernel matrix: a Debian suite's current kernel, fetched and unpacked.

`debian:6.1` is bookworm's `linux-image-amd64` (from the system's own APT sources), `debian:6.12`
is trixie's (from the private APT root, trixie without backports). Each is the suite's current
kernel, as Debian serves only that: the exact package and version taken are printed and kept in
the cache (CACHE/kernels/<package>_<version>/), and a cached one is used when the archive cannot
be asked. Returns the unpacked /lib/modules/<version> tree, which `--kernel` understands.
"""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

from harness.deps.aptroot import AptRoot
from harness.deps.common import Context, DepsError, log, replace_dir, run
from harness.deps.pins import Pin, find_deb

META = "linux-image-amd64"
#: name -> (suite, from the system's APT sources?)
SUITES = {"6.1": ("bookworm", True), "6.12": ("trixie", False)}


def _candidate(apt: AptRoot, suite: str, system: bool) -> tuple[str, str]:
    """(image package, version) that the suite's linux-image-amd64 points at now."""
    offered = apt.offered(META, system=system, suite=None if system else suite)
    if not offered:
        raise DepsError(f"{META} is not offered by {'the system' if system else 'the private'} "
                        f"APT sources ({suite})")
    meta = offered[-1]
    m = re.search(r"(linux-image-\S+-amd64) \(= ([^)]+)\)",
                  apt.field(META, meta, "Depends", system=system))
    if not m:
        raise DepsError(f"{META}={meta} does not depend on a linux-image-<version>-amd64")
    return m.group(1), m.group(2)


def fetch(ctx: Context, name: str) -> Path:
    """The modules tree of kernel `name` (a key of SUITES), downloading it if needed."""
    if name not in SUITES:
        raise DepsError(f"unknown kernel {name!r}: one of {', '.join(SUITES)}")
    suite, system = SUITES[name]
    root = ctx.cache / "kernels"
    apt = AptRoot(ctx)
    try:
        package, version = _candidate(apt, suite, system)
    except DepsError as exc:
        cached = sorted(root.glob(f"linux-image-{name}*/**/lib/modules/*"))
        if cached:
            log(f"{exc}; using the cached {cached[-1]}")
            return cached[-1]
        raise
    target = root / f"{package}_{version}"
    kver = package.removeprefix("linux-image-")
    # Merged /usr (trixie) puts the modules under usr/lib/modules.
    trees = [target / "lib" / "modules" / kver, target / "usr" / "lib" / "modules" / kver]
    for mdir in trees:
        if mdir.is_dir():
            return mdir
    dest = ctx.downloads / "kernels"
    pin = Pin(package, version, "0" * 64)
    if find_deb(dest, pin) is None:
        log(f"downloading {package} {version} ({suite})")
        apt.download([pin.spec()], dest, system=system)
    deb = find_deb(dest, pin)
    if deb is None:
        raise DepsError(f"{pin.spec()} was not downloaded into {dest}")
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    run(["dpkg-deb", "-x", deb, tmp])
    replace_dir(tmp, target)
    for mdir in trees:
        if mdir.is_dir():
            log(f"kernel {name}: {package} {version} -> {mdir}")
            return mdir
    raise DepsError(f"{deb.name} has no lib/modules/{kver}")


def main(argv: list[str]) -> int:
    """`python3 -m harness.deps.kernels NAME`: print the modules tree path."""
    from harness import paths

    if len(argv) != 1:
        print(f"usage: python3 -m harness.deps.kernels {{{','.join(SUITES)}}}", file=sys.stderr)
        return 2
    ctx = Context(repo=paths.repo_root(), cache=paths.cache_dir(), venv=Path(), check=False)
    try:
        print(fetch(ctx, argv[0]))
    except DepsError as exc:
        print(f"deps: ERROR: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
