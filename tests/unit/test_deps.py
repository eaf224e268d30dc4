"""Unit tests of harness.deps' pure pieces: pins, sha256, versions, locks, manifest, modinfo."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from harness import paths
from harness.deps import guest, manifest, venv
from harness.deps.common import DepsError
from harness.deps.pins import (
    Pin,
    debian_version_compare,
    find_deb,
    format_pins,
    load_pins,
    parse_pins,
    verify_sha256,
    version_at_least,
    version_tuple,
)

REPO = Path(__file__).resolve().parents[2]
SHA_A = "a" * 64
QEMU_SHA = "1e7f6681384d059be58d95e33c978ff901ae268fb44064335d52564379170747"


def test_parse_pins_comments_blank_and_file_field() -> None:
    text = f"# header\n\nfoo 1:2.0-1 {SHA_A}  # trailing\nbar 3 {SHA_A} bar_3.orig.tar.xz\n"
    pins = parse_pins(text)
    assert pins == [Pin("foo", "1:2.0-1", SHA_A), Pin("bar", "3", SHA_A, "bar_3.orig.tar.xz")]


@pytest.mark.parametrize(
    "line",
    [
        "foo 1.0",  # too few fields
        f"foo 1.0 {SHA_A} x y",  # too many
        "foo 1.0 " + "A" * 64,  # uppercase hex
        "foo 1.0 " + "a" * 63,  # short
    ],
)
def test_parse_pins_rejects_bad_lines(line: str) -> None:
    with pytest.raises(DepsError):
        parse_pins(line)


def test_parse_pins_rejects_duplicates() -> None:
    with pytest.raises(DepsError, match="twice"):
        parse_pins(f"foo 1 {SHA_A}\nfoo 2 {SHA_A}\n")


def test_format_then_parse_round_trip() -> None:
    pins = [Pin("z", "1:1.0-1~bpo13+1", SHA_A), Pin("a", "2", SHA_A, "a.tar.xz")]
    assert parse_pins(format_pins(pins, header="one\ntwo")) == sorted(pins, key=lambda p: p.name)


def test_committed_locks_parse_and_pin_the_known_hashes() -> None:
    qemu_pins = {p.name: p for p in load_pins(REPO / "qemu/pins/qemu-debs.lock")}
    assert qemu_pins["qemu-system-x86"].version == "1:11.1.3+ds-2~bpo13+1"
    assert qemu_pins["qemu-system-x86"].sha256 == QEMU_SHA
    src, _tree = load_pins(REPO / "qemu/pins/libvfio-user.lock")
    assert src.file == "qemu_10.0.13+ds.orig.tar.xz"
    guest_pins = load_pins(REPO / "qemu/pins/guest-debs.lock")
    assert guest.kernel_version_of(guest_pins) == "7.3.4+deb13-amd64"
    load_pins(REPO / "qemu/pins/busybox.lock")
    lock = venv.parse_lock((REPO / "qemu/pins/requirements.lock").read_text())
    for name in ("cffi", "pyroute2", "qemu-qmp", "numpy", "pytest", "hypothesis", "mypy", "ruff"):
        assert name in lock


def test_deb_glob_quotes_epoch(tmp_path: Path) -> None:
    pin = Pin("qemu-system-x86", "1:11.1.3+ds-1~bpo13+1", QEMU_SHA)
    deb = tmp_path / "qemu-system-x86_1%3a11.1.3+ds-1~bpo13+1_amd64.deb"
    deb.write_bytes(b"x")
    assert find_deb(tmp_path, pin) == deb
    assert find_deb(tmp_path, Pin("qemu-system-x86", "1:11.1.4", QEMU_SHA)) is None


def test_verify_sha256(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"hello")
    verify_sha256(f, hashlib.sha256(b"hello").hexdigest())
    with pytest.raises(DepsError, match="mismatch"):
        verify_sha256(f, SHA_A)
    with pytest.raises(DepsError, match="missing"):
        verify_sha256(tmp_path / "nope", SHA_A)


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ("1.0", "1.0", 0),
        ("1.0", "1.1", -1),
        ("1:1.0", "2.0", 1),  # epoch wins
        ("1.0~rc1", "1.0", -1),  # tilde sorts first
        ("1:11.1.3+ds-1~bpo13+1", "1:11.1.3+ds-1", -1),  # backport below the release
        ("1:11.1.3+ds-1~bpo13+1", "1:11.1.2+ds-5", 1),
        ("1.10", "1.9", 1),  # numeric, not lexical
        ("7.3.4-1~bpo13+1", "7.3.4-1~bpo13+2", -1),
        ("1.0a", "1.0+", -1),  # letters before non-letters
        ("1.0-1", "1.0", 1),
    ],
)
def test_debian_version_compare(a: str, b: str, expected: int) -> None:
    assert debian_version_compare(a, b) == expected
    assert debian_version_compare(b, a) == -expected


def test_version_at_least() -> None:
    assert version_tuple("11.1.3+ds") == (11, 1, 3)
    assert version_at_least("10.1", (10, 1))
    assert version_at_least("10.1.0", (10, 1))
    assert version_at_least("11.0", (10, 1))
    assert not version_at_least("10.0.13", (10, 1))
    assert not version_at_least("7.2.19", (10, 1))
    with pytest.raises(ValueError):
        version_tuple("abc")


def test_requirements_lock_parse() -> None:
    text = (
        f"a==1.0 \\\n    --hash=sha256:{SHA_A} \\\n    --hash=sha256:{'b' * 64}\n"
        f"B_c==2\\\n --hash=sha256:{SHA_A}\n"
    )
    assert venv.parse_lock(text) == {"a": ("1.0", [SHA_A, "b" * 64]), "b-c": ("2", [SHA_A])}
    with pytest.raises(DepsError, match="no --hash"):
        venv.parse_lock("a==1.0\n")


def _env(tmp: Path) -> paths.Env:
    files = {n: tmp / n for n in ("k", "bb", "m1", "m2")}
    for f in files.values():
        f.write_bytes(b"x")
    return paths.Env(
        qemu=("/ld.so", "--library-path", "/lib", "/qemu"),
        qemu_version="11.1.3",
        libvfio_user_prefix=tmp,
        kernel=files["k"],
        kernel_version="7.3.4+deb13-amd64",
        modules={"failover": files["m1"], "virtio_net": files["m2"]},
        busybox=files["bb"],
    )


def test_manifest_round_trip(tmp_path: Path) -> None:
    env = _env(tmp_path)
    text = manifest.render(env)
    assert manifest.parse(text) == env
    data = json.loads(text)
    assert set(data) == {
        "qemu",
        "qemu_version",
        "libvfio_user_prefix",
        "kernel",
        "kernel_version",
        "modules",
        "busybox",
        "provenance",
        "drift",
    }
    assert list(data["modules"]) == ["failover", "virtio_net"]  # load order kept
    (tmp_path / "env.json").write_text(text)
    assert paths.load_env(tmp_path / "env.json") == env


def test_load_env_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(paths.EnvError, match="make deps"):
        paths.load_env(tmp_path / "env.json")
    (tmp_path / "env.json").write_text("{not json")
    with pytest.raises(paths.EnvError, match="make deps"):
        paths.load_env(tmp_path / "env.json")
    env = _env(tmp_path)
    env.kernel.unlink()
    (tmp_path / "env.json").write_text(manifest.render(env))
    with pytest.raises(paths.EnvError, match="missing files"):
        paths.load_env(tmp_path / "env.json")
    (tmp_path / "env.json").write_text(json.dumps({"qemu": []}))
    with pytest.raises(paths.EnvError):
        paths.load_env(tmp_path / "env.json")


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "hc"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert paths.cache_dir() == tmp_path / "hc"
    monkeypatch.delenv("HARNESS_CACHE")
    assert paths.cache_dir() == tmp_path / "xdg" / "harness"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert paths.cache_dir() == tmp_path / ".cache" / "harness"
    assert paths.build_dir() == paths.repo_root() / "build"


def _ko(
    name: str, depends: str, vermagic: str = "7.3.4+deb13-amd64 SMP preempt mod_unload "
) -> bytes:
    return b"\x7fELF junk\0" + f"depends={depends}\0name={name}\0vermagic={vermagic}\0".encode()


def test_modinfo_and_module_checks() -> None:
    kver = "7.3.4+deb13-amd64"
    mods = {
        "failover": _ko("failover", ""),
        "net_failover": _ko("net_failover", "failover"),
        "virtio_net": _ko("virtio_net", "net_failover"),
    }
    assert guest.modinfo(mods["virtio_net"])["depends"] == ["net_failover"]
    builtin = {"virtio", "virtio_ring", "virtio_pci"}
    guest.check_modules(mods, builtin, kver)
    with pytest.raises(DepsError, match="neither built in nor shipped"):
        guest.check_modules({"virtio_net": mods["virtio_net"]}, builtin, kver)
    with pytest.raises(DepsError, match="vermagic"):
        guest.check_modules({"failover": _ko("failover", "", "6.1.0 SMP")}, builtin, kver)
    with pytest.raises(DepsError, match="does not build in"):
        guest.check_modules(mods, {"virtio"}, kver)


@pytest.mark.parametrize(
    ("debian", "root", "expected"),
    [
        (True, False, "as root run: apt-get install -y --no-install-recommends cpio meson"),
        (False, True, "not a Debian-like system"),
    ],
)
def test_missing_host_tools_name_the_fix(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, debian: bool, root: bool, expected: str
) -> None:
    from harness.deps import hosttools
    from harness.deps.common import Context

    monkeypatch.setattr(hosttools, "missing_packages", lambda: ["cpio", "meson"])
    monkeypatch.setattr(hosttools, "is_debian_like", lambda: debian)
    monkeypatch.setattr(hosttools, "is_root", lambda: root)
    ctx = Context(repo=tmp_path, cache=tmp_path, venv=tmp_path / "venv", check=False)
    with pytest.raises(DepsError, match=expected):
        hosttools.ensure(ctx)
