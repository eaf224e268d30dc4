"""The one cffi build module: declares the libvfio-user API we use and compiles harness.vfu._vfu.

API (out-of-line) mode against the libvfio-user copy the installer builds (upstream 0b28d20 as
shipped in Debian's qemu 10.0.13 source, LIB_VFIO_USER_MINOR 1). Constants are taken from the real
headers with `#define X ...`, so nothing here is a hand-copied number. Callbacks go through
`extern "Python"` trampolines (see harness.vfu.callbacks).

The client guard (its C source is in harness.vfu.clientguard): the extension is linked with
`-Wl,--wrap` for the socket calls libvfio-user's transport makes (accept, recv, recvmsg, sendmsg)
and for its internal dma_controller_add_region, so that no vfio-user client can stall or crash
the server:
- every accepted connection gets SO_RCVTIMEO/SO_SNDTIMEO (the context's client timeout); a
  blocking read or write that hits it shuts the connection down and fails with ETIMEDOUT (this
  libvfio-user reads the VERSION message and every message body blocking, and writes replies
  blocking: without the timeout a client that stops in the middle of a message, or stops reading
  replies, would hang the whole server);
- every error reply the library sends is counted by command (the exact count of requests it
  refused with a reply), read out by VfuContext after each call into the library;
- a DMA_MAP the device could never use is refused before the library registers it (size 0, not
  4 KiB aligned, wrapping past 2^64, or beyond the end of its file, which would be a SIGBUS on
  access): this libvfio-user accepts those and ignores what its register callback thinks.

Run `python -m harness.vfu.build` to compile `harness/vfu/_vfu*.so`. The install prefix comes from
$LIBVFIO_USER_PREFIX, else from the environment manifest (harness.paths.load_env()).
"""

from __future__ import annotations

import argparse
import ctypes.util
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from cffi import FFI

from harness.vfu import burst, burst_rx, burst_tx, clientguard, mapcache
from harness.vfu.clientguard import WIRE_STRUCT

log = logging.getLogger(__name__)

MODULE_NAME = "harness.vfu._vfu"
PACKAGE_DIR = Path(__file__).resolve().parent
#: Region indices that get a trampoline: BAR0..5, ROM, config space. The C region callback does
#: not say which region it serves, so each index needs its own C entry point.
REGION_TRAMPOLINES = 8

CDEF_TYPES = """
typedef int... loff_t;
struct iovec { void *iov_base; size_t iov_len; ...; };

typedef struct vfu_ctx vfu_ctx_t;
typedef ... vfu_pci_config_space_t;

typedef enum { VFU_TRANS_SOCK, ... } vfu_trans_t;
typedef enum { VFU_DEV_TYPE_PCI, ... } vfu_dev_type_t;
typedef enum {
    VFU_PCI_TYPE_CONVENTIONAL, VFU_PCI_TYPE_EXPRESS, ...
} vfu_pci_type_t;
typedef enum vfu_reset_type {
    VFU_RESET_DEVICE, VFU_RESET_LOST_CONN, VFU_RESET_PCI_FLR, ...
} vfu_reset_type_t;
enum vfu_dev_irq_type { VFU_DEV_INTX_IRQ, VFU_DEV_MSI_IRQ, VFU_DEV_MSIX_IRQ, ... };

typedef struct vfu_dma_info {
    struct iovec iova;
    void *vaddr;
    struct iovec mapping;
    size_t page_size;
    uint32_t prot;
    ...;
} vfu_dma_info_t;

typedef void (vfu_log_fn_t)(vfu_ctx_t *vfu_ctx, int level, const char *msg);
typedef ssize_t (vfu_region_access_cb_t)(vfu_ctx_t *vfu_ctx, char *buf, size_t count,
                                         loff_t offset, bool is_write);
typedef int (vfu_reset_cb_t)(vfu_ctx_t *vfu_ctx, vfu_reset_type_t type);
typedef void (vfu_dma_register_cb_t)(vfu_ctx_t *vfu_ctx, vfu_dma_info_t *info);
typedef void (vfu_dma_unregister_cb_t)(vfu_ctx_t *vfu_ctx, vfu_dma_info_t *info);

""" + WIRE_STRUCT.replace("HARNESS_NR_COMMANDS", "...")

CDEF_CONSTANTS = """
#define LIB_VFIO_USER_MAJOR ...
#define LIB_VFIO_USER_MINOR ...
#define LIBVFIO_USER_FLAG_ATTACH_NB ...
#define VFU_REGION_FLAG_READ ...
#define VFU_REGION_FLAG_WRITE ...
#define VFU_REGION_FLAG_RW ...
#define VFU_REGION_FLAG_MEM ...
#define VFU_CAP_FLAG_EXTENDED ...
#define VFU_CAP_FLAG_CALLBACK ...
#define VFU_CAP_FLAG_READONLY ...
#define VFU_PCI_DEV_BAR0_REGION_IDX ...
#define VFU_PCI_DEV_ROM_REGION_IDX ...
#define VFU_PCI_DEV_CFG_REGION_IDX ...
#define PCI_HEADER_TYPE_NORMAL ...
#define PCI_CFG_SPACE_SIZE ...
#define PCI_CFG_SPACE_EXP_SIZE ...
#define PCI_CAP_ID_MSIX ...
#define PCI_CAP_MSIX_SIZEOF ...
#define PCI_MSIX_FLAGS_QSIZE ...
#define PCI_REVISION_ID ...
#define PROT_READ ...
#define PROT_WRITE ...
#define LOG_ERR ...
#define LOG_WARNING ...
#define LOG_NOTICE ...
#define LOG_INFO ...
#define LOG_DEBUG ...
#define VFIO_USER_VERSION ...
#define VFIO_USER_DMA_MAP ...
#define VFIO_USER_DMA_UNMAP ...
#define VFIO_USER_DEVICE_GET_INFO ...
#define VFIO_USER_DEVICE_GET_REGION_INFO ...
#define VFIO_USER_DEVICE_GET_REGION_IO_FDS ...
#define VFIO_USER_DEVICE_GET_IRQ_INFO ...
#define VFIO_USER_DEVICE_SET_IRQS ...
#define VFIO_USER_REGION_READ ...
#define VFIO_USER_REGION_WRITE ...
#define VFIO_USER_DMA_READ ...
#define VFIO_USER_DMA_WRITE ...
#define VFIO_USER_DEVICE_RESET ...
#define VFIO_USER_DIRTY_PAGES ...
#define HARNESS_NR_COMMANDS ...
#define HARNESS_DMA_GRANULE ...
"""

CDEF_FUNCTIONS = """
vfu_ctx_t *vfu_create_ctx(vfu_trans_t trans, const char *path, int flags, void *pvt,
                          vfu_dev_type_t dev_type);
int vfu_realize_ctx(vfu_ctx_t *vfu_ctx);
int vfu_attach_ctx(vfu_ctx_t *vfu_ctx);
int vfu_get_poll_fd(vfu_ctx_t *vfu_ctx);
int vfu_run_ctx(vfu_ctx_t *vfu_ctx);
void vfu_destroy_ctx(vfu_ctx_t *vfu_ctx);
void *vfu_get_private(vfu_ctx_t *vfu_ctx);
int vfu_setup_log(vfu_ctx_t *vfu_ctx, vfu_log_fn_t *log, int level);
int vfu_setup_region(vfu_ctx_t *vfu_ctx, int region_idx, size_t size,
                     vfu_region_access_cb_t *region_access, int flags,
                     struct iovec *mmap_areas, uint32_t nr_mmap_areas, int fd, uint64_t offset);
int vfu_setup_device_reset_cb(vfu_ctx_t *vfu_ctx, vfu_reset_cb_t *reset);
int vfu_setup_device_dma(vfu_ctx_t *vfu_ctx, vfu_dma_register_cb_t *dma_register,
                         vfu_dma_unregister_cb_t *dma_unregister);
int vfu_setup_device_nr_irqs(vfu_ctx_t *vfu_ctx, enum vfu_dev_irq_type type, uint32_t count);
int vfu_irq_trigger(vfu_ctx_t *vfu_ctx, uint32_t subindex);
int vfu_pci_init(vfu_ctx_t *vfu_ctx, vfu_pci_type_t pci_type, int hdr_type, int revision);
void vfu_pci_set_id(vfu_ctx_t *vfu_ctx, uint16_t vid, uint16_t did, uint16_t ssvid,
                    uint16_t ssid);
void vfu_pci_set_class(vfu_ctx_t *vfu_ctx, uint8_t base, uint8_t sub, uint8_t pi);
vfu_pci_config_space_t *vfu_pci_get_config_space(vfu_ctx_t *vfu_ctx);
ssize_t vfu_pci_add_capability(vfu_ctx_t *vfu_ctx, size_t pos, int flags, void *data);

void harness_mb(void);
void harness_set_client_timeout(int ms);
void harness_wire_take(harness_wire_t *out);
void harness_close_duplicate_map_fd(void);
"""

CDEF_TRAMPOLINES = """
extern "Python" void harness_log_cb(vfu_ctx_t *, int, const char *);
extern "Python" int harness_reset_cb(vfu_ctx_t *, vfu_reset_type_t);
extern "Python" void harness_dma_register_cb(vfu_ctx_t *, vfu_dma_info_t *);
extern "Python" void harness_dma_unregister_cb(vfu_ctx_t *, vfu_dma_info_t *);
""" + "".join(
    f'extern "Python" ssize_t harness_region_cb{i}(vfu_ctx_t *, char *, size_t, loff_t, bool);\n'
    for i in range(REGION_TRAMPOLINES)
)

#: Symbols of libvfio-user.a that C_SOURCE wraps (the linker's --wrap: the archive's calls go
#: to __wrap_X, which calls the real one as __real_X). All are undefined references of the
#: archive's objects, which is what --wrap redirects (checked by `nm` on the 0b28d20 build).
WRAPPED = ("accept", "recv", "recvmsg", "sendmsg", "dma_controller_add_region",
           *mapcache.WRAPPED)

C_SOURCE = r"""
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <syslog.h>
#include <unistd.h>
#include <linux/pci_regs.h>
#include "libvfio-user.h"

/* A full fence for ring index publication; Python has no portable way to emit one. */
static void harness_mb(void) { __sync_synchronize(); }
""" + clientguard.C_SOURCE


def _find_prefix(explicit: str | None) -> Path:
    """The libvfio-user install prefix: argument, $LIBVFIO_USER_PREFIX, then the env manifest."""
    if explicit:
        return Path(explicit)
    env = os.environ.get("LIBVFIO_USER_PREFIX")
    if env:
        return Path(env)
    try:
        from harness import paths

        return Path(paths.load_env().libvfio_user_prefix)
    except Exception as exc:  # no manifest yet, or an unreadable one: say what to do
        raise SystemExit(
            f"libvfio-user prefix unknown ({exc}): set LIBVFIO_USER_PREFIX or run `make deps`"
        ) from exc


def _first_existing(candidates: list[Path], what: str) -> Path:
    for path in candidates:
        if path.exists():
            return path
    raise SystemExit(f"{what} not found; looked in: " + ", ".join(map(str, candidates)))


def _json_c_link_args() -> tuple[list[str], list[str]]:
    """(libraries, extra_link_args) for json-c, which libvfio-user.a needs for VERSION parsing."""
    if shutil.which("pkg-config"):
        res = subprocess.run(
            ["pkg-config", "--libs", "json-c"], capture_output=True, text=True, check=False
        )
        if res.returncode == 0 and res.stdout.strip():
            return [], res.stdout.split()
    # Without the -dev package only the runtime soname exists: link against it by name.
    soname = ctypes.util.find_library("json-c")
    if soname:
        return [], [f"-l:{soname}"]
    return ["json-c"], []


def make_ffi(prefix: Path) -> FFI:
    """The FFI object for the libvfio-user installed under prefix."""
    include = _first_existing(
        [prefix / "include" / "vfio-user", prefix / "include"], "libvfio-user.h's directory"
    )
    if not (include / "libvfio-user.h").exists():
        raise SystemExit(f"{include / 'libvfio-user.h'} missing")
    static_lib = _first_existing(
        [
            prefix / "lib" / "libvfio-user.a",
            prefix / "lib64" / "libvfio-user.a",
            prefix / "lib" / "x86_64-linux-gnu" / "libvfio-user.a",
        ],
        "libvfio-user.a",
    )
    libraries, link_args = _json_c_link_args()
    ffibuilder = FFI()
    ffibuilder.cdef(CDEF_TYPES + CDEF_CONSTANTS + CDEF_FUNCTIONS + mapcache.CDEF
                    + burst.CDEF + CDEF_TRAMPOLINES)
    ffibuilder.set_source(
        MODULE_NAME,
        C_SOURCE + mapcache.C_SOURCE + burst.C_SOURCE,
        include_dirs=[str(include)],
        # Static so the extension has no run-time dependency on the cache directory.
        extra_objects=[str(static_lib)],
        libraries=libraries,
        extra_link_args=[*link_args, *(f"-Wl,--wrap={sym}" for sym in WRAPPED)],
        define_macros=[("_GNU_SOURCE", "1")],
    )
    return ffibuilder


def _inputs_digest(prefix: Path) -> str:
    """What the extension is built from: these modules, the static library and its headers."""
    sources = (__file__, clientguard.__file__, mapcache.__file__, burst.__file__,
               burst_tx.__file__, burst_rx.__file__)
    h = hashlib.sha256(b"".join(Path(str(f)).read_bytes() for f in sources))
    for path in sorted(prefix.rglob("*")):
        if path.is_file() and (path.suffix in (".a", ".h")):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _stamp() -> Path:
    return PACKAGE_DIR / "_vfu.stamp"


def build_if_needed(prefix: Path, *, verbose: bool = False) -> tuple[Path | None, bool]:
    """Build unless an extension built from the same inputs is already there."""
    digest = _inputs_digest(prefix)
    existing = sorted(PACKAGE_DIR.glob(f"{MODULE_NAME.rsplit('.', 1)[-1]}*.so"))
    stamp = _stamp()
    if existing and stamp.exists() and stamp.read_text().strip() == digest:
        return existing[0], False
    target = build(prefix, verbose=verbose)
    stamp.write_text(digest + "\n")
    return target, True


def build(prefix: Path, *, verbose: bool = False) -> Path:
    """Compile the extension and copy it next to this file; returns the .so path."""
    ffibuilder = make_ffi(prefix)
    with tempfile.TemporaryDirectory(prefix="harness-vfu-build-") as tmp:
        built = Path(ffibuilder.compile(tmpdir=tmp, verbose=verbose))
        target = PACKAGE_DIR / built.name
        # Replace atomically so a running process that has the old .so mapped keeps working.
        staging = target.with_suffix(".so.tmp")
        shutil.copy2(built, staging)
        staging.replace(target)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.vfu.build", description=__doc__)
    parser.add_argument("--prefix", help="libvfio-user install prefix (include/, lib/)")
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--force", action="store_true", help="rebuild even if up to date")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    prefix = _find_prefix(args.prefix)
    if args.force:
        target: Path | None = build(prefix, verbose=args.verbose)
        _stamp().write_text(_inputs_digest(prefix) + "\n")
        built = True
    else:
        target, built = build_if_needed(prefix, verbose=args.verbose)
    log.info("%s %s against %s", "built" if built else "up to date:", target, prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
