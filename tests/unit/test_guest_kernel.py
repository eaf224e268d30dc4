"""--kernel: finding the image, the module closure (dependencies first) and the config check."""

from __future__ import annotations

import lzma
from pathlib import Path

import pytest

from harness import paths
from harness.guest import kernel as K

CONFIG_OK = "\n".join(f"{k}={v[0]}" for k, v in {**K.NEEDED, **K.NEEDED_VIOMMU}.items())


def bzimage(path: Path, version: str) -> Path:
    data = bytearray(0x400 + 256)
    data[0x202:0x206] = b"HdrS"
    data[0x20E:0x210] = (0x400 - 0x200).to_bytes(2, "little")
    text = f"{version} (builder@host) #1 SMP".encode()
    data[0x400:0x400 + len(text)] = text
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return path


def ko(path: Path, depends: str) -> None:
    body = b"\x7fELF....\0name=x\0depends=" + depends.encode() + b"\0vermagic=v\0"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(lzma.compress(body) if path.name.endswith(".xz") else body)


def modules_tree(root: Path, version: str = "6.1.0-50-amd64", *, builtin: str = "",
                 config: str = CONFIG_OK) -> Path:
    """A Debian-package-shaped tree: <root>/lib/modules/<v>, <root>/boot/vmlinuz-<v>."""
    mdir = root / "lib" / "modules" / version
    k = mdir / "kernel" / "drivers"
    ko(k / "virtio" / "virtio.ko.xz", "")
    ko(k / "virtio" / "virtio_ring.ko.xz", "virtio")
    ko(k / "virtio" / "virtio_pci.ko.xz", "virtio_ring,virtio,virtio_pci_modern_dev")
    ko(k / "virtio" / "virtio_pci_modern_dev.ko", "")
    ko(k / "net" / "failover.ko.xz", "")
    ko(k / "net" / "net_failover.ko.xz", "failover")
    ko(k / "net" / "virtio_net.ko.xz", "net_failover,virtio,virtio_ring")
    (mdir / "modules.builtin").write_text(builtin)
    bzimage(root / "boot" / f"vmlinuz-{version}", version)
    (root / "boot" / f"config-{version}").write_text(config)
    return mdir


def env(tmp: Path) -> paths.Env:
    return paths.Env(qemu=("q",), qemu_version="11", libvfio_user_prefix=tmp, kernel=tmp / "k",
                     kernel_version="7.3.4", modules={"virtio_net": tmp / "v.ko"},
                     busybox=tmp / "bb")


def test_modules_tree_closure_loads_dependencies_first(tmp_path: Path) -> None:
    mdir = modules_tree(tmp_path)
    k = K.resolve(mdir, env(tmp_path), viommu=True)
    assert k.version == "6.1.0-50-amd64"
    assert k.image == tmp_path / "boot" / "vmlinuz-6.1.0-50-amd64"
    order = list(k.modules)
    assert set(order) == {"virtio", "virtio_ring", "virtio_pci_modern_dev", "virtio_pci",
                          "failover", "net_failover", "virtio_net"}
    for mod, deps in {"virtio_ring": ["virtio"], "virtio_pci": ["virtio_ring", "virtio",
                      "virtio_pci_modern_dev"], "net_failover": ["failover"],
                      "virtio_net": ["net_failover", "virtio", "virtio_ring"]}.items():
        assert all(order.index(d) < order.index(mod) for d in deps), (mod, order)


def test_builtin_modules_are_not_loaded(tmp_path: Path) -> None:
    builtin = "kernel/drivers/virtio/virtio.ko\nkernel/drivers/virtio/virtio_ring.ko\n" \
              "kernel/drivers/virtio/virtio_pci.ko\n"
    k = K.resolve(modules_tree(tmp_path, builtin=builtin), env(tmp_path), viommu=False)
    assert list(k.modules) == ["failover", "net_failover", "virtio_net"]


def test_missing_dependency_is_named(tmp_path: Path) -> None:
    mdir = modules_tree(tmp_path)
    (mdir / "kernel/drivers/net/failover.ko.xz").unlink()
    with pytest.raises(K.KernelError, match="failover \\(needed by net_failover\\)"):
        K.resolve(mdir, env(tmp_path), viommu=False)


def test_a_module_that_cannot_be_unpacked_is_a_kernel_error_naming_it(tmp_path: Path) -> None:
    mdir = modules_tree(tmp_path)
    (mdir / "kernel/drivers/net/failover.ko.xz").write_bytes(b"not xz at all")
    with pytest.raises(K.KernelError, match=r"^failover: .*failover.ko.xz does not unpack"):
        K.resolve(mdir, env(tmp_path), viommu=False)


def test_config_lacking_options_is_refused_before_boot(tmp_path: Path) -> None:
    config = CONFIG_OK.replace("CONFIG_VIRTIO_NET=y", "# CONFIG_VIRTIO_NET is not set")
    mdir = modules_tree(tmp_path, config=config.replace("CONFIG_INTEL_IOMMU=y", ""))
    with pytest.raises(K.KernelError) as exc:
        K.resolve(mdir, env(tmp_path), viommu=True)
    assert "CONFIG_VIRTIO_NET=y|m (has not set)" in str(exc.value)
    assert "CONFIG_INTEL_IOMMU=y" in str(exc.value)
    # Without --viommu the IOMMU is not needed, but virtio_net still is.
    with pytest.raises(K.KernelError, match="CONFIG_VIRTIO_NET") as exc:
        K.resolve(mdir, env(tmp_path), viommu=False)
    assert "INTEL_IOMMU" not in str(exc.value)


def test_build_tree_and_bare_bzimage(tmp_path: Path) -> None:
    tree = tmp_path / "linux"
    bzimage(tree / "arch/x86/boot/bzImage", "7.4.0-rc1+")
    (tree / ".config").write_text(CONFIG_OK)
    ko(tree / "drivers/net/failover.ko", "")
    ko(tree / "drivers/net/net_failover.ko", "failover")
    ko(tree / "drivers/net/virtio_net.ko", "net_failover")
    (tree / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    for given in (tree, tree / "arch/x86/boot/bzImage"):
        k = K.resolve(given, env(tmp_path), viommu=False)
        assert k.version == "7.4.0-rc1+" and k.source == f"build tree {tree}"
        assert list(k.modules) == ["failover", "net_failover", "virtio_net"]
    bare = K.resolve(bzimage(tmp_path / "vmlinuz", "6.12.1"), env(tmp_path), viommu=False)
    assert bare.version == "6.12.1" and bare.modules == {} and bare.notes


def test_not_a_kernel(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"not a kernel" * 100)
    with pytest.raises(K.KernelError, match="not an x86 bzImage"):
        K.resolve(tmp_path / "x", env(tmp_path), viommu=False)
    with pytest.raises(K.KernelError, match="does not exist"):
        K.resolve(tmp_path / "nope", env(tmp_path), viommu=False)
    with pytest.raises(K.KernelError, match="is not a bzImage, a kernel build tree"):
        K.resolve(tmp_path, env(tmp_path), viommu=False)


def test_pinned_kernel_when_none_given(tmp_path: Path) -> None:
    k = K.resolve(None, env(tmp_path), viommu=True)
    assert k.version == "7.3.4" and list(k.modules) == ["virtio_net"]


def test_the_system_map_beside_a_kernel_is_found(tmp_path: Path) -> None:
    """A stalled boot's addresses are named from it (harness.vm.stall.SymbolMap)."""
    tree = tmp_path / "linux"
    bzimage(tree / "arch/x86/boot/bzImage", "7.4.0-rc1+")
    (tree / ".config").write_text(CONFIG_OK)
    ko(tree / "drivers/net/virtio_net.ko", "")
    (tree / "modules.builtin").write_text("kernel/drivers/virtio/virtio_pci.ko\n")
    assert K.resolve(tree, env(tmp_path), viommu=False).system_map is None
    (tree / "System.map").write_text("ffffffff81000000 T _text\n")
    for given in (tree, tree / "arch/x86/boot/bzImage"):
        assert K.resolve(given, env(tmp_path), viommu=False).system_map == tree / "System.map"
    root = tmp_path / "pkg"
    mdir = modules_tree(root)
    (root / "boot" / "System.map-6.1.0-50-amd64").write_text("ffffffff81000000 T _text\n")
    assert K.resolve(mdir, env(tmp_path), viommu=False).system_map == \
        root / "boot" / "System.map-6.1.0-50-amd64"
    bare = bzimage(tmp_path / "b" / "vmlinuz", "6.12.1")
    (bare.parent / "System.map").write_text("ffffffff81000000 T _text\n")
    assert K.resolve(bare, env(tmp_path), viommu=False).system_map == bare.parent / "System.map"
