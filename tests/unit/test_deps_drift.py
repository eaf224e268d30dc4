"""The drift policy of harness.deps against a real apt-get and a local file repository.

Each test builds an archive that has moved on from a lock (newer revisions of libraries, a
QEMU or kernel that replaced the pinned one, nothing acceptable left) and checks what
`make deps` takes, what it says, and that a populated cache then works with no archive at all.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from harness.deps import guest, qemu, resolve
from harness.deps.aptroot import AptRoot
from harness.deps.common import Context, DepsError, sha256_file
from harness.deps.libvfio_user import check_tree, tree_digest
from harness.deps.pins import Pin, format_pins, load_pins
from harness.testing.aptrepo import AptRepo, FakeDeb

REPO = Path(__file__).resolve().parents[2]
OLD_SHA = "0" * 63 + "1"  # what a lock recorded for a revision the archive no longer serves
QEMU_PINNED = "1:11.1.3+ds-1~bpo13+1"
LIBDIR = "usr/lib/x86_64-linux-gnu"

pytestmark = pytest.mark.skipif(shutil.which("apt-get") is None or shutil.which("gcc") is None,
                                reason="needs apt-get, dpkg-deb and gcc (Debian host tools)")

FAKE_QEMU_C = r"""
#include <stdio.h>
#include <string.h>
int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--version")) { puts("QEMU emulator version " VERSION); return 0; }
        if (!strcmp(argv[i], "help")) { puts(DEVICES); return 0; }
    }
    return 1;
}
"""


def fake_qemu(tmp: Path, version: str, *, vfio_user: bool = True) -> Path:
    """A binary that answers --version and -device help like qemu-system-x86_64."""
    src = tmp / "fake-qemu.c"
    src.write_text(FAKE_QEMU_C)
    out = tmp / f"qemu-{version}-{int(vfio_user)}"
    devices = 'name \\"vfio-user-pci\\", bus PCI' if vfio_user else 'name \\"e1000\\", bus PCI'
    subprocess.run(["gcc", "-O0", "-o", str(out), str(src), f'-DVERSION="{version}"',
                    f'-DDEVICES="{devices}"'], check=True)
    return out


def host_loader() -> Path:
    return Path("/lib64/ld-linux-x86-64.so.2").resolve()


def qemu_debs(tmp: Path, version: str, *, vfio_user: bool = True) -> list[FakeDeb]:
    upstream = resolve.upstream(version).split("+")[0]
    return [
        FakeDeb("qemu-system-x86", version, depends="libc6 (>= 2.41), libfake1",
                files={"usr/bin/qemu-system-x86_64": fake_qemu(tmp, upstream,
                                                               vfio_user=vfio_user)}),
    ]


def make_ctx(tmp: Path, repo: AptRepo, locks: dict[str, str]) -> Context:
    """A checkout with its own locks and a cache of its own, pointing at the local archive."""
    checkout = tmp / "checkout"
    shutil.copytree(REPO / "qemu" / "apt", checkout / "qemu" / "apt", dirs_exist_ok=True)
    (checkout / "qemu" / "pins").mkdir(parents=True, exist_ok=True)
    for name, text in locks.items():
        (checkout / "qemu" / "pins" / name).write_text(text)
    sources = tmp / "sources.list"
    sources.write_text(repo.sources_list())
    return Context(repo=checkout, cache=tmp / "cache", venv=tmp / "venv", check=False,
                   apt_sources=sources)


def archive(tmp: Path, qemu_version: str = QEMU_PINNED, *, vfio_user: bool = True) -> AptRepo:
    """trixie: libraries at today's revisions; trixie-backports: QEMU."""
    repo = AptRepo(tmp / "archive")
    repo.add("trixie", FakeDeb("libc6", "2.41-12+deb13u5",
                               files={f"{LIBDIR}/ld-linux-x86-64.so.2": host_loader()}))
    repo.add("trixie", FakeDeb("libfake1", "1.0-1+deb13u1"))
    for deb in qemu_debs(tmp, qemu_version, vfio_user=vfio_user):
        repo.add("trixie-backports", deb)
    repo.publish()
    return repo


def qemu_lock(repo: AptRepo, qemu_sha: str | None = None) -> str:
    """A lock written nine days ago: QEMU as offered, the libraries at revisions now gone."""
    if qemu_sha is None:
        qemu_sha = sha256_file(next((repo.root / "pool").glob("qemu-system-x86_*.deb")))
    pins = [Pin("qemu-system-x86", QEMU_PINNED, qemu_sha),
            Pin("libc6", "2.41-12+deb13u4", OLD_SHA),
            Pin("libfake1", "1.0-1", OLD_SHA)]
    return format_pins(pins, header="test lock")


def test_moved_library_revisions_are_taken_with_one_warning(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    repo = archive(tmp_path)
    ctx = make_ctx(tmp_path, repo, {qemu.LOCK: qemu_lock(repo)})
    result, q = qemu.ensure_private(ctx)
    assert q.version == "11.1.3" and result.status == "installed"
    (line,) = result.drift
    assert "libc6 2.41-12+deb13u4 -> 2.41-12+deb13u5" in line
    assert "libfake1 1.0-1 -> 1.0-1+deb13u1" in line
    assert "PINNED VERSION GONE" not in line  # QEMU itself did not move
    warnings = [ln for ln in capsys.readouterr().err.splitlines() if "WARNING" in ln]
    assert warnings == [f"deps: WARNING: {line}"]
    # What was really installed is recorded, with the hashes of the files used.
    manifest = resolve.Resolved.load(ctx.cache / qemu.RESOLVED,
                                     sha256_file(ctx.pins / qemu.LOCK))
    assert manifest is not None
    assert manifest.by_name()["libc6"].version == "2.41-12+deb13u5"
    libc = next((ctx.downloads / "qemu-debs").glob("libc6_*.deb"))
    assert manifest.by_name()["libc6"].sha256 == sha256_file(libc)


def test_populated_cache_needs_no_archive(tmp_path: Path) -> None:
    repo = archive(tmp_path)
    ctx = make_ctx(tmp_path, repo, {qemu.LOCK: qemu_lock(repo)})
    qemu.ensure_private(ctx)
    shutil.rmtree(repo.root)  # no network, no mirror: the verified cache must be enough
    shutil.rmtree(ctx.cache / "apt" / "state" / "lists")
    result, q = qemu.ensure_private(ctx)
    assert result.status == "cached" and q.version == "11.1.3"
    assert result.drift and "libc6" in result.drift[0]  # still said, every time


def test_tampered_cache_file_is_refused(tmp_path: Path) -> None:
    repo = archive(tmp_path)
    ctx = make_ctx(tmp_path, repo, {qemu.LOCK: qemu_lock(repo)})
    qemu.ensure_private(ctx)
    libc = next((ctx.downloads / "qemu-debs").glob("libc6_*.deb"))
    libc.write_bytes(libc.read_bytes() + b"x")
    with pytest.raises(DepsError, match="changed since it was installed"):
        qemu.ensure_private(ctx)


def test_gone_qemu_pin_takes_newest_acceptable_loudly(tmp_path: Path) -> None:
    repo = archive(tmp_path, "1:11.2.0+ds-1~bpo13+1")
    ctx = make_ctx(tmp_path, repo, {qemu.LOCK: qemu_lock(repo, qemu_sha=OLD_SHA)})
    result, q = qemu.ensure_private(ctx)
    assert q.version == "11.2.0"
    assert "PINNED VERSION GONE" in result.drift[0]
    assert f"qemu-system-x86 {QEMU_PINNED} -> 1:11.2.0+ds-1~bpo13+1" in result.drift[0]


def test_pinned_qemu_is_preferred_over_a_newer_one(tmp_path: Path) -> None:
    repo = archive(tmp_path)
    for fake in qemu_debs(tmp_path, "1:11.2.0+ds-1~bpo13+1"):
        repo.add("trixie-backports", fake)
    repo.publish()
    pinned = next((repo.root / "pool").glob("qemu-system-x86_1%3a11.1.3*.deb"))
    ctx = make_ctx(tmp_path, repo, {qemu.LOCK: qemu_lock(repo, qemu_sha=sha256_file(pinned))})
    result, q = qemu.ensure_private(ctx)
    assert q.version == "11.1.3"
    assert "qemu-system-x86" not in result.drift[0]


def test_nothing_satisfies_the_qemu_constraint(tmp_path: Path) -> None:
    repo = archive(tmp_path, "1:10.0.13+ds-0+deb13u1")
    ctx = make_ctx(tmp_path, repo, {qemu.LOCK: qemu_lock(repo, qemu_sha=OLD_SHA)})
    with pytest.raises(DepsError) as exc:
        qemu.ensure_private(ctx)
    msg = str(exc.value)
    assert "no offered version (1:10.0.13+ds-0+deb13u1) satisfies QEMU >= 10.1" in msg
    assert "Fix:" in msg


def test_candidate_without_vfio_user_is_refused(tmp_path: Path) -> None:
    repo = archive(tmp_path, "1:11.2.0+ds-1~bpo13+1", vfio_user=False)
    ctx = make_ctx(tmp_path, repo, {qemu.LOCK: qemu_lock(repo, qemu_sha=OLD_SHA)})
    with pytest.raises(DepsError, match=r"does not satisfy QEMU >= 10\.1 with vfio-user-pci"):
        qemu.ensure_private(ctx)
    assert not qemu.root_dir(ctx).exists()


def test_same_version_different_content_is_an_integrity_error(tmp_path: Path) -> None:
    repo = archive(tmp_path)
    ctx = make_ctx(tmp_path, repo, {qemu.LOCK: qemu_lock(repo, qemu_sha="f" * 64)})
    with pytest.raises(DepsError, match="same version as the lock but a different sha256"):
        qemu.ensure_private(ctx)


# --- the guest kernel ---------------------------------------------------------------------


def kernel_pins(kver: str, version: str, sha: str = OLD_SHA) -> list[Pin]:
    return [Pin(f"{part}-{kver}", version, sha) for part in guest.KERNEL_PARTS]


def kernel_archive(tmp: Path, kver: str, version: str, meta: bool = True) -> AptRepo:
    repo = AptRepo(tmp / "archive")
    for part in guest.KERNEL_PARTS:
        repo.add("trixie-backports", FakeDeb(f"{part}-{kver}", version))
    if meta:
        repo.add("trixie-backports", FakeDeb(
            guest.KERNEL_META, version, depends=f"linux-image-{kver} (= {version})"))
        repo.add("trixie-backports", FakeDeb(f"linux-image-{kver}", version))
    repo.publish()
    return repo


def test_kernel_new_revision_of_the_same_packages(tmp_path: Path) -> None:
    repo = kernel_archive(tmp_path, "7.3.4+deb13-amd64", "7.3.4-1~bpo13+2")
    ctx = make_ctx(tmp_path, repo, {})
    pins, drift = guest.resolve_kernel(AptRoot(ctx), kernel_pins("7.3.4+deb13-amd64",
                                                                  "7.3.4-1~bpo13+1"),
                                       tmp_path / "debs")
    assert {p.version for p in pins} == {"7.3.4-1~bpo13+2"}
    assert len(drift) == 3
    assert all(str(d).endswith("7.3.4-1~bpo13+1 -> 7.3.4-1~bpo13+2") for d in drift)


def test_kernel_gone_follows_linux_image_amd64(tmp_path: Path) -> None:
    repo = kernel_archive(tmp_path, "7.4.1+deb13-amd64", "7.4.1-1~bpo13+1")
    ctx = make_ctx(tmp_path, repo, {})
    pins, drift = guest.resolve_kernel(AptRoot(ctx), kernel_pins("7.3.4+deb13-amd64",
                                                                  "7.3.4-1~bpo13+1"),
                                       tmp_path / "debs")
    assert guest.kernel_version_of(pins) == "7.4.1+deb13-amd64"
    assert all(d.matters for d in drift) and len(drift) == 3
    assert "PINNED VERSION GONE" in resolve.drift_line("guest", drift)


def test_kernel_gone_and_no_candidate(tmp_path: Path) -> None:
    repo = kernel_archive(tmp_path, "7.4.1+deb13-amd64", "7.4.1-1~bpo13+1", meta=False)
    ctx = make_ctx(tmp_path, repo, {})
    with pytest.raises(DepsError, match="neither is linux-image-amd64"):
        guest.resolve_kernel(AptRoot(ctx), kernel_pins("7.3.4+deb13-amd64", "7.3.4-1~bpo13+1"),
                             tmp_path / "debs")


# --- the libvfio-user source --------------------------------------------------------------


def test_libvfio_user_tree_pin_accepts_same_content_from_any_tarball(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "lib").mkdir(parents=True)
    (tree / "lib" / "dma.c").write_text("int x;\n")
    pin = Pin("libvfio-user", "0b28d20", tree_digest(tree))
    check_tree(tree, pin, "qemu_10.0.14+ds.orig.tar.xz")  # same content: accepted
    (tree / "lib" / "dma.c").write_text("int y;\n")
    with pytest.raises(DepsError, match="different libvfio-user than the pinned 0b28d20"):
        check_tree(tree, pin, "qemu_10.0.14+ds.orig.tar.xz")


def test_committed_libvfio_user_lock_pins_the_tree() -> None:
    pins = {p.name: p for p in load_pins(REPO / "qemu/pins/libvfio-user.lock")}
    assert pins["libvfio-user"].version == "0b28d20"
    assert pins["qemu"].file == "qemu_10.0.13+ds.orig.tar.xz"
