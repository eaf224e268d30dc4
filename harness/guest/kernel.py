"""The guest kernel under test: the pinned one, or the user's (--kernel PATH), with its modules.

`--kernel` takes a bzImage, a kernel build tree (arch/x86/boot/bzImage, .config, the .ko files it
built), or an installed modules tree (/lib/modules/<version>, or one unpacked from a Debian
package, with the image in <root>/boot/vmlinuz-<version> or <dir>/vmlinuz). The modules the guest
needs (virtio_net and, where they are modular, virtio_pci and the virtio core) are found by file
name (.ko, .ko.xz, .ko.gz, .ko.zst), recognised as built in through modules.builtin, and loaded
with their whole dependency closure (from each module's own `depends=`, so no depmod output is
needed), dependencies first. A kernel that lacks what the run needs is refused before boot with
the missing config options named.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from harness import paths
from harness.guest.initramfs import read_module

#: What the guest must load or have built in, per run (roots of the module closure).
ROOTS = ("virtio_pci", "virtio_net")
#: Config options every run needs (y, or m where the module closure provides it).
NEEDED = {
    "CONFIG_PCI": ("y",),
    "CONFIG_BLK_DEV_INITRD": ("y",),
    "CONFIG_DEVTMPFS": ("y",),
    "CONFIG_SERIAL_8250": ("y",),
    "CONFIG_SERIAL_8250_CONSOLE": ("y",),
    "CONFIG_VIRTIO_PCI": ("y", "m"),
    "CONFIG_VIRTIO_NET": ("y", "m"),
}
NEEDED_VIOMMU = {"CONFIG_INTEL_IOMMU": ("y",), "CONFIG_IOMMU_SUPPORT": ("y",)}
_SUFFIXES = (".ko", ".ko.xz", ".ko.gz", ".ko.zst")


class KernelError(ValueError):
    """The given kernel cannot run the plan; the message names what is missing."""


@dataclass(frozen=True)
class GuestKernel:
    image: Path
    version: str
    #: Where it came from, for summaries: "pinned Debian package ...", "build tree /x", ...
    source: str
    #: name -> module file, in load order (dependencies first).
    modules: dict[str, Path] = field(default_factory=dict)
    #: Parsed .config (empty when none was found; the check is then skipped, with a note).
    config: dict[str, str] = field(default_factory=dict)
    builtin: frozenset[str] = frozenset()
    notes: tuple[str, ...] = ()
    #: Its System.map when one was found beside it (names the addresses of a stalled boot,
    #: harness.vm.stall); None otherwise.
    system_map: Path | None = None


def _first_file(candidates: list[Path]) -> Path | None:
    return next((c for c in candidates if c.is_file()), None)


def bzimage_version(image: Path) -> str:
    """The version string an x86 bzImage carries in its setup header ('' if none)."""
    data = image.read_bytes()[:0x10000]
    if data[0x202:0x206] != b"HdrS":
        raise KernelError(f"{image} is not an x86 bzImage (no HdrS magic)")
    ptr = int.from_bytes(data[0x20E:0x210], "little")
    if not ptr:
        return ""
    raw = data[ptr + 0x200: ptr + 0x200 + 256]
    return raw.split(b"\0", 1)[0].decode(errors="replace").split(" ", 1)[0]


def parse_config(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(CONFIG_\w+)=(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip('"')
    return out


def modinfo_depends(ko: bytes) -> list[str]:
    for raw in ko.split(b"\0"):
        if raw.startswith(b"depends="):
            return [d for d in raw[8:].decode(errors="replace").split(",") if d]
    return []


def _canon(name: str) -> str:
    return name.replace("-", "_")


def index_modules(root: Path) -> dict[str, Path]:
    """Module name -> file under root (first found wins; names with '-' match '_')."""
    out: dict[str, Path] = {}
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            for suffix in _SUFFIXES:
                if f.endswith(suffix):
                    out.setdefault(_canon(f[: -len(suffix)]), Path(dirpath) / f)
    return out


def read_builtin(path: Path) -> frozenset[str]:
    try:
        lines = path.read_text().split()
    except FileNotFoundError:
        return frozenset()
    return frozenset(_canon(Path(ln).name.removesuffix(".ko")) for ln in lines)


def closure(roots: tuple[str, ...], index: dict[str, Path], builtin: frozenset[str],
            ) -> dict[str, Path]:
    """The modules to load for roots, dependencies first; KernelError if one is missing."""
    order: dict[str, Path] = {}
    visiting: set[str] = set()

    def visit(name: str, wanted_by: str) -> None:
        name = _canon(name)
        if name in order or name in builtin:
            return
        if name in visiting:
            raise KernelError(f"module dependency loop through {name}")
        path = index.get(name)
        if path is None:
            raise KernelError(f"{name} (needed by {wanted_by}) is neither built in nor among "
                              "the kernel's modules")
        visiting.add(name)
        try:
            ko = read_module(path)
        except (OSError, ValueError) as exc:  # unreadable, or compressed past what we unpack
            raise KernelError(f"{name}: {exc}") from None
        for dep in modinfo_depends(ko):
            visit(dep, name)
        visiting.discard(name)
        order[name] = path

    for root in roots:
        visit(root, "the guest")
    return order


def check_config(config: dict[str, str], *, viommu: bool) -> None:
    need = dict(NEEDED)
    if viommu:
        need.update(NEEDED_VIOMMU)
    missing = []
    for opt, ok in need.items():
        if config.get(opt) not in ok:
            missing.append(f"{opt}={'|'.join(ok)} (has {config.get(opt, 'not set')})")
    if missing:
        raise KernelError("the kernel lacks what the run needs: " + "; ".join(missing))


def _from_modules_dir(mdir: Path, given: Path) -> GuestKernel:
    version = mdir.name
    # <root>/lib/modules/<v> or, with merged /usr, <root>/usr/lib/modules/<v>: <root>/boot.
    roots = [p for p in mdir.parents[2:4]]
    candidates = [mdir / "vmlinuz", *(r / "boot" / f"vmlinuz-{version}" for r in roots),
                  Path("/boot") / f"vmlinuz-{version}"]
    image = next((c for c in candidates if c.is_file()), None)
    if image is None:
        raise KernelError(f"no kernel image for {version}: looked at "
                          + ", ".join(str(c) for c in candidates))
    configs = [mdir / "config", *(r / "boot" / f"config-{version}" for r in roots),
               Path("/boot") / f"config-{version}"]
    config = next((c for c in configs if c.is_file()), None)
    system_map = _first_file([mdir / "System.map",
                              *(r / "boot" / f"System.map-{version}" for r in roots),
                              Path("/boot") / f"System.map-{version}"])
    return GuestKernel(
        image=image, version=version, source=f"modules tree {given}",
        modules=index_modules(mdir), builtin=read_builtin(mdir / "modules.builtin"),
        config=parse_config(config.read_text()) if config else {},
        notes=() if config else (f"no config found for {version}: options not checked",),
        system_map=system_map)


def _from_build_tree(tree: Path) -> GuestKernel:
    image = tree / "arch" / "x86" / "boot" / "bzImage"
    version = bzimage_version(image)
    config = tree / ".config"
    return GuestKernel(image=image, version=version, source=f"build tree {tree}",
                       modules=index_modules(tree), builtin=read_builtin(tree / "modules.builtin"),
                       config=parse_config(config.read_text()) if config.is_file() else {},
                       system_map=_first_file([tree / "System.map"]))


def fetch_debian(name: str) -> Path:
    """`debian:6.1`/`debian:6.12`: that suite's current kernel, fetched into the cache."""
    from harness.deps.common import Context, DepsError
    from harness.deps.kernels import fetch

    ctx = Context(repo=paths.repo_root(), cache=paths.cache_dir(), venv=Path(), check=False)
    try:
        return fetch(ctx, name)
    except DepsError as exc:
        raise KernelError(str(exc)) from None


def locate(path: Path) -> GuestKernel:
    """What the user pointed at, before the module closure is computed."""
    if str(path).startswith("debian:"):
        k = locate(fetch_debian(str(path).removeprefix("debian:")))
        return GuestKernel(image=k.image, version=k.version, source=f"{path} = {k.source}",
                           modules=k.modules, config=k.config, builtin=k.builtin,
                           notes=k.notes, system_map=k.system_map)
    path = path.expanduser().resolve()
    if not path.exists():
        raise KernelError(f"{path} does not exist")
    if path.is_file():
        tree = path.parents[3] if len(path.parents) > 3 else None
        if path.name == "bzImage" and tree is not None and (tree / ".config").is_file():
            return _from_build_tree(tree)
        version = bzimage_version(path)
        return GuestKernel(image=path, version=version, source=f"bzImage {path}",
                           notes=("a bare bzImage: virtio_net and virtio_pci must be built in "
                                  "(no modules directory given)",),
                           system_map=_first_file([path.with_name("System.map")]))
    if (path / "arch" / "x86" / "boot" / "bzImage").is_file():
        return _from_build_tree(path)
    if (path / "modules.builtin").is_file() or (path / "kernel").is_dir():
        return _from_modules_dir(path, path)
    raise KernelError(f"{path} is not a bzImage, a kernel build tree or a /lib/modules/<version> "
                      "tree")


def resolve(path: Path | None, env: paths.Env, *, viommu: bool) -> GuestKernel:
    """The kernel to boot and the modules to load, checked; the pinned one when path is None."""
    if path is None:
        return GuestKernel(image=Path(env.kernel), version=env.kernel_version,
                           source=env.provenance.get("guest", "pinned (env.json)"),
                           modules=dict(env.modules))
    k = locate(path)
    if k.config:
        check_config(k.config, viommu=viommu)
    if not k.modules and not k.builtin:
        return k  # a bare bzImage: nothing to load
    mods = closure(ROOTS, k.modules, k.builtin)
    return GuestKernel(image=k.image, version=k.version, source=k.source, modules=mods,
                       config=k.config, builtin=k.builtin, notes=k.notes,
                       system_map=k.system_map)
