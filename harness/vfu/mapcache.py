"""The DMA mapping cache of the vfio-user extension: one mmap per guest-RAM file, not per DMA_MAP.

libvfio-user maps every DMA region's fd itself: ``mmap`` + ``madvise(MADV_DONTDUMP)`` at each
DMA_MAP and ``munmap`` at each DMA_UNMAP. Behind a vIOMMU every page the guest maps is its own
DMA_MAP of the same guest-RAM memfd at another offset, and QEMU's vCPU waits for our reply to
each: those three system calls, plus the page fault on the first touch of each new mapping,
are ~6.8 us per map/unmap pair (measured in C on this machine: 512 MiB memfd, random pages),
a third of the server's reply.

This C source (compiled into ``harness.vfu._vfu`` by harness.vfu.build, whose link wraps
``mmap64``, ``munmap`` and ``madvise`` of libvfio-user.a) maps each file once, whole, read and
write, and hands out ``base + offset`` for every region of it; the library's ``munmap`` of such
a region only drops a reference, and the file's mapping goes when its last region does (a
client's detach removes every region, so nothing outlives the guest that shared it). Pages
stay in our page tables across map/unmap, so there is no fault per map either.

What does not change: the region the library registers (iova, size, vaddr, prot), hence the
device's view of it, which is exactly ``[vaddr, vaddr + size)`` and read-only unless the map
had write permission (harness.vfu.dmaregs); the guard's refusals before it (harness.vfu.build).
Anything the cache cannot serve exactly (an address hint, flags other than MAP_SHARED, not a
regular file, a file over 64 GiB, a range past the end of the file as it was when first
mapped, an fd that cannot be mapped read-write, more than 16 files) is the library's own mmap,
as before: the whole mappings stay within 1 TiB of address space whatever a client sends.

``HARNESS_MAP_CACHE=off`` (read by harness.vfu.mapcachectl) turns it off, for A/Bs in
``harness bench net``. Single-threaded like libvfio-user; the counters are per process.
"""

from __future__ import annotations

#: Symbols of libvfio-user.a the cache wraps (its dma.c calls mmap64 on this build; checked by
#: ``nm``; a unit test fails if the library's maps stop coming here).
WRAPPED = ("mmap64", "munmap", "madvise")

CDEF = """
void harness_map_cache_enable(int on);
void harness_map_cache_stats(uint64_t out[4]);
"""

#: Order of harness_map_cache_stats()' counters.
STATS = ("hits", "fallbacks", "files_mapped", "files_released")

C_SOURCE = r"""
/* ---- the DMA mapping cache (see harness.vfu.mapcache) ---------------------------------- */

#define HARNESS_MAP_FILES 16
/* Larger files are the library's to map region by region: the client chooses the file, and
 * 16 whole mappings of sparse 2^46-byte files would take our address space (malloc too). */
#define HARNESS_MAP_FILE_MAX (64ULL << 30)

typedef struct {
    dev_t dev;
    ino_t ino;
    char *base;          /* NULL: slot free */
    size_t len;          /* the file's size when it was mapped */
    uint64_t users;      /* live regions handed out of it */
} harness_mapfile_t;

static harness_mapfile_t harness_mapfiles[HARNESS_MAP_FILES];
static int harness_map_cache_on = 1;
/* hits, fallbacks (a map the cache could not serve), files mapped, files released */
static uint64_t harness_map_counts[4];

void *__real_mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t offset);
int __real_munmap(void *addr, size_t len);
int __real_madvise(void *addr, size_t len, int advice);

static void harness_map_cache_enable(int on) { harness_map_cache_on = on; }

static void harness_map_cache_stats(uint64_t out[4])
{
    memcpy(out, harness_map_counts, sizeof(harness_map_counts));
}

static harness_mapfile_t *harness_mapfile_of(const void *addr)
{
    int i;

    for (i = 0; i < HARNESS_MAP_FILES; i++) {
        harness_mapfile_t *f = &harness_mapfiles[i];
        if (f->base != NULL && (const char *)addr >= f->base &&
            (const char *)addr < f->base + f->len) {
            return f;
        }
    }
    return NULL;
}

static void harness_mapfile_release(harness_mapfile_t *f)
{
    (void) __real_munmap(f->base, f->len);
    f->base = NULL;
    harness_map_counts[3]++;
}

/* base + offset inside the file's one mapping, or NULL: let the library map it itself. */
static void *harness_cached_map(size_t len, int prot, int fd, off_t offset)
{
    harness_mapfile_t *f = NULL, *slot = NULL;
    struct stat st;
    int i;

    if ((prot & ~(PROT_READ | PROT_WRITE)) != 0 || offset < 0 || fstat(fd, &st) != 0 ||
        !S_ISREG(st.st_mode) || st.st_size <= 0 ||
        (uint64_t)st.st_size > HARNESS_MAP_FILE_MAX || (uint64_t)offset > (uint64_t)st.st_size ||
        len > (uint64_t)st.st_size - (uint64_t)offset) {
        return NULL;
    }
    for (i = 0; i < HARNESS_MAP_FILES && f == NULL; i++) {
        harness_mapfile_t *c = &harness_mapfiles[i];
        if (c->base == NULL) {
            slot = slot != NULL ? slot : c;
        } else if (c->dev == st.st_dev && c->ino == st.st_ino) {
            f = c;
        }
    }
    if (f != NULL && ((uint64_t)offset > f->len || len > f->len - (uint64_t)offset)) {
        /* The file grew since it was mapped: map it again at its new size once nothing
         * points into the old mapping; until then the new tail is the library's to map. */
        if (f->users != 0) {
            return NULL;
        }
        harness_mapfile_release(f);
        slot = f;
        f = NULL;
    }
    if (f == NULL) {
        void *base;

        if (slot == NULL) {
            return NULL;
        }
        /* Read-write whatever this region asked: the device's view of a read-only region is
         * read-only in Python (harness.vfu.dmaregs), and later regions may be writable. */
        base = __real_mmap64(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED,
                             fd, 0);
        if (base == MAP_FAILED) {
            return NULL;
        }
        (void) __real_madvise(base, (size_t)st.st_size, MADV_DONTDUMP);
        f = slot;
        f->dev = st.st_dev;
        f->ino = st.st_ino;
        f->base = base;
        f->len = (size_t)st.st_size;
        f->users = 0;
        harness_map_counts[2]++;
    }
    f->users++;
    harness_map_counts[0]++;
    return f->base + offset;
}

void *__wrap_mmap64(void *addr, size_t len, int prot, int flags, int fd, off_t offset)
{
    if (harness_map_cache_on && addr == NULL && flags == MAP_SHARED && fd >= 0 && len > 0) {
        void *p = harness_cached_map(len, prot, fd, offset);
        if (p != NULL) {
            return p;
        }
        harness_map_counts[1]++;
    }
    return __real_mmap64(addr, len, prot, flags, fd, offset);
}

int __wrap_munmap(void *addr, size_t len)
{
    harness_mapfile_t *f = harness_mapfile_of(addr);

    if (f == NULL) {
        return __real_munmap(addr, len);
    }
    if (f->users > 0 && --f->users == 0) {
        harness_mapfile_release(f);
    }
    return 0;
}

int __wrap_madvise(void *addr, size_t len, int advice)
{
    /* The file's mapping was advised MADV_DONTDUMP as a whole when it was made. */
    if (advice == MADV_DONTDUMP && harness_mapfile_of(addr) != NULL) {
        return 0;
    }
    return __real_madvise(addr, len, advice);
}
"""
