"""Host tools: compilers, build tools and dev libraries exist (apt-get install them as root)."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from harness.deps.common import (
    Context,
    DepsError,
    StepResult,
    is_debian_like,
    is_root,
    log,
    run,
)

# command -> Debian package providing it
COMMANDS: dict[str, str] = {
    "gcc": "gcc",
    "make": "make",
    "pkg-config": "pkg-config",
    "meson": "meson",
    "ninja": "ninja-build",
    "patch": "patch",
    "tar": "tar",
    "xz": "xz-utils",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
    "ip": "iproute2",
    "cpio": "cpio",  # the initramfs tests cross-check our newc writer against it
    "tshark": "tshark",  # the capture tests read --pcap files with the real Wireshark reader
    "zstd": "zstd",  # unpacks zstd kernels for the PVH boot (harness.guest.pvh) and .ko.zst
}
# pkg-config module -> Debian package
PKGCONFIG: dict[str, str] = {
    "json-c": "libjson-c-dev",  # libvfio-user links it
    "cmocka": "libcmocka-dev",  # libvfio-user's meson.build requires it even without tests
}


def missing_packages() -> list[str]:
    missing = [pkg for cmd, pkg in COMMANDS.items() if shutil.which(cmd) is None]
    if shutil.which("pkg-config") is not None:
        for mod, pkg in PKGCONFIG.items():
            if run(["pkg-config", "--exists", mod], check=False).returncode != 0:
                missing.append(pkg)
    else:
        missing.extend(PKGCONFIG.values())
    if not _has_venv_support():
        missing.append("python3-venv")
    return sorted(set(missing))


def _has_venv_support() -> bool:
    try:
        import ensurepip  # noqa: F401
    except ImportError:
        return False
    return True


def ensure(ctx: Context) -> StepResult:
    missing = missing_packages()
    if not missing:
        return StepResult("host tools", "system", "ok")
    cmd = f"apt-get install -y --no-install-recommends {' '.join(missing)}"
    if ctx.check:
        raise DepsError(f"missing host packages: {' '.join(missing)} (fix: {cmd})")
    if not is_debian_like():
        raise DepsError(
            f"missing host tools (Debian names: {' '.join(missing)}) and this is not a Debian-like "
            "system: install the equivalents with your package manager"
        )
    if not is_root():
        raise DepsError(f"missing host packages: {' '.join(missing)}; as root run: {cmd}")
    if "python3-venv" in missing and not sys.executable.startswith("/usr/bin/"):
        raise DepsError(f"{sys.executable} has no ensurepip/venv: use a Python with venv support")
    log(f"installing host packages: {' '.join(missing)}")
    env = {"DEBIAN_FRONTEND": "noninteractive", "LC_ALL": "C"}
    argv = ["apt-get", "install", "-y", "--no-install-recommends", *missing]
    cp = run(argv, env=env, check=False)
    if cp.returncode != 0:
        log("apt-get install failed; running apt-get update once and retrying")
        run(["apt-get", "update"], env=env)
        run(argv, env=env)
    still = missing_packages()
    if still:
        raise DepsError(f"still missing after apt-get install: {' '.join(still)}")
    return StepResult(f"host tools ({' '.join(missing)})", "system", "installed")


def which(cmd: str) -> Path:
    p = shutil.which(cmd)
    if p is None:
        raise DepsError(f"{cmd} not found (run the host-tools step)")
    return Path(p)
