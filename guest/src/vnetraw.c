/* vnetraw: a raw userspace virtio-net driver (modern virtio-pci, split rings, polling).
 *
 * It takes the virtio-net device (1af4:1041) away from the kernel, enables memory space and
 * bus mastering in its config space, maps BAR0 (register offsets from the vendor
 * capabilities), and drives rx0/tx0 itself with rings and buffers in locked pages. Every byte
 * the device reads was written here. Two hardware-access backends (struct hw below):
 *   sysfs (no IOMMU): unbind, config space and resource0 through sysfs, device addresses =
 *         guest-physical addresses from /proc/self/pagemap;
 *   vfio  (--vfio, or automatic when the device is bound to vfio-pci; behind a vIOMMU): bind
 *         to vfio-pci (driver_override), type1v2 container on /dev/vfio/<group>, config space
 *         and BAR0 as device-fd regions, one VFIO_IOMMU_MAP_DMA per page at IOVAs chosen here
 *         (IOVA_BASE, nowhere near guest RAM), so a device address that skipped the guest's
 *         IOMMU faults. Needs the vfio, vfio_iommu_type1, vfio-pci modules loaded.
 *
 * Usage: vnetraw <command> [--option value]...
 *   udp-echo --count N --seed S [--first I]
 *                                ARP for the host, then stop-and-wait UDP echo of datagrams
 *                                I .. I+N-1 of the test schedule (guest/src/stream.h) with the
 *                                host peer (port 5003); every echo is checked byte for byte
 *                                (and its checksums).
 *   arp                          ARP request for the host; checks the reply's fields.
 *   status                       print the device status register (no reset, no init).
 *   reset                        reset the device (status 0) and wait for it.
 *   hostile CASE                 initialise, do one malformed thing, report the device's
 *                                reaction (status, used.idx), reset. `hostile list` lists them.
 *                                unmap-held-buffer needs the vfio backend (exit 5 without).
 *   fuzz --seed S --iterations N [--first I]
 *                                seeded random rings, descriptors and register writes, a reset
 *                                after each iteration (guest/src/vnetfuzz.h).
 * Options: --bdf DDDD:BB:DD.F (default: the first 1af4:1041), --timeout SEC (default 30),
 *          --host A.B.C.D (198.18.0.1), --addr A.B.C.D (198.18.0.2), --port P (5003),
 *          --queue-size N (16), --rto-ms MS (200), --max-retries K (20),
 *          --vfio (flag: the vfio backend).
 *
 * Output: one stdout line of key=value results; on failure one stderr line with the reason.
 * Exit: 0 ok, 1 verification failed, 2 usage, 3 device/setup failure, 4 timeout,
 *       5 hostile case not applicable (needs a feature the device does not offer).
 * The device is always reset before exit (it must not DMA into pages we give back).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <linux/vfio.h>

#include "stream.h"

#define EXIT_VERIFY 1
#define EXIT_USAGE 2
#define EXIT_SETUP 3
#define EXIT_TIMEOUT 4
#define EXIT_NA 5 /* a hostile case needs a feature the device does not offer */

#define PAGE 4096u
#define NPAGES 96u
#define MAXQ 32u

/* virtio constants */
#define ST_ACK 1u
#define ST_DRIVER 2u
#define ST_DRIVER_OK 4u
#define ST_FEATURES_OK 8u
#define ST_NEEDS_RESET 0x40u
#define ST_FAILED 0x80u
#define F_MAC 5
#define F_VERSION_1 32
#define D_NEXT 1u
#define D_WRITE 2u
#define D_INDIRECT 4u
#define NO_VECTOR 0xffffu

/* common config offsets */
#define C_DFSEL 0
#define C_DF 4
#define C_GFSEL 8
#define C_GF 12
#define C_MSIX 16
#define C_NUMQ 18
#define C_STATUS 20
#define C_GEN 21
#define C_QSEL 22
#define C_QSIZE 24
#define C_QMSIX 26
#define C_QENABLE 28
#define C_QNOFF 30
#define C_QDESC 32
#define C_QAVAIL 40
#define C_QUSED 48

#define HDR_LEN 12u
#define ETH_LEN 14u

struct opts {
	const char *bdf;
	double timeout;
	uint32_t host_ip, addr_ip;
	unsigned port;
	unsigned qsize;
	unsigned rto_ms;
	unsigned max_retries;
	uint64_t count;
	uint64_t first;
	uint64_t seed;
	int vfio;
};

struct vq {
	unsigned index, size;
	volatile uint8_t *desc, *avail, *used;
	uint64_t desc_pa, avail_pa, used_pa;
	uint8_t *buf[MAXQ];
	uint64_t buf_pa[MAXQ]; /* *_pa: device addresses (guest-physical, or IOVA with vfio) */
	uint16_t avail_idx, last_used;
	volatile uint16_t *notify;
};

struct dev {
	char bdf[256];
	int cfg_fd;      /* sysfs config file, or the vfio device fd */
	off_t cfg_base;  /* where config space starts in cfg_fd (the vfio config region) */
	int vfio;        /* the vfio backend is in use */
	int container, group;
	volatile uint8_t *bar0;
	size_t bar0_len;
	uint32_t common, isr, device, notify, notify_mult;
	uint64_t features;
	uint8_t mac[6];
	struct vq q[2]; /* rx0, tx0 */
	uint8_t *mem;
	uint64_t pa[NPAGES]; /* device address of each page */
	unsigned next_page;
	int inited;
};

static struct dev D;
static struct opts O;
static double deadline;

/* ---- output ------------------------------------------------------------------------------ */

static void line(int fd, const char *fmt, va_list ap)
{
	char buf[768];
	int n = vsnprintf(buf, sizeof(buf) - 1, fmt, ap);
	if (n < 0)
		n = 0;
	if ((size_t)n > sizeof(buf) - 2)
		n = (int)sizeof(buf) - 2;
	buf[n++] = '\n';
	if (write(fd, buf, (size_t)n) < 0)
		return;
}

static void out(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	line(1, fmt, ap);
	va_end(ap);
}

static void dev_reset_quiet(void);

/* Reason on stderr, device reset, exit with code. */
static void die(int code, const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	line(2, fmt, ap);
	va_end(ap);
	dev_reset_quiet();
	exit(code);
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void check_deadline(const char *what)
{
	if (now() > deadline)
		die(EXIT_TIMEOUT, "timeout after %.1f s: %s", O.timeout, what);
}

/* ---- MMIO: exact widths, one access each (each becomes one vfio-user region access) ------- */

static inline void mb(void) { __sync_synchronize(); }

static uint8_t r8(uint32_t off) { return *(volatile uint8_t *)(D.bar0 + off); }
static uint16_t r16(uint32_t off) { return *(volatile uint16_t *)(D.bar0 + off); }
static uint32_t r32(uint32_t off) { return *(volatile uint32_t *)(D.bar0 + off); }
static void w8(uint32_t off, uint8_t v) { *(volatile uint8_t *)(D.bar0 + off) = v; mb(); }
static void w16(uint32_t off, uint16_t v) { *(volatile uint16_t *)(D.bar0 + off) = v; mb(); }
static void w32(uint32_t off, uint32_t v) { *(volatile uint32_t *)(D.bar0 + off) = v; mb(); }
static void w64(uint32_t off, uint64_t v)
{
	w32(off, (uint32_t)v);
	w32(off + 4, (uint32_t)(v >> 32));
}

static uint8_t status_rd(void) { return r8(D.common + C_STATUS); }
static void status_wr(uint8_t v) { w8(D.common + C_STATUS, v); }

/* ---- sysfs ---------------------------------------------------------------------------------- */

static int read_hex_file(const char *path, unsigned *v)
{
	char buf[32];
	int fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	close(fd);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	*v = (unsigned)strtoul(buf, NULL, 16);
	return 0;
}

static int write_file(const char *path, const char *s)
{
	int fd = open(path, O_WRONLY);
	if (fd < 0)
		return -1;
	ssize_t n = write(fd, s, strlen(s));
	int e = errno;
	close(fd);
	errno = e;
	return n == (ssize_t)strlen(s) ? 0 : -1;
}

static void find_device(void)
{
	char path[512];
	if (O.bdf) {
		snprintf(D.bdf, sizeof(D.bdf), "%s", O.bdf);
		return;
	}
	DIR *d = opendir("/sys/bus/pci/devices");
	if (!d)
		die(EXIT_SETUP, "opendir /sys/bus/pci/devices: %s", strerror(errno));
	struct dirent *e;
	char best[256] = "";
	while ((e = readdir(d))) {
		unsigned ven, dev;
		if (e->d_name[0] == '.')
			continue;
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/vendor", e->d_name);
		if (read_hex_file(path, &ven))
			continue;
		snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/device", e->d_name);
		if (read_hex_file(path, &dev))
			continue;
		if (ven == 0x1af4 && dev == 0x1041 && (!best[0] || strcmp(e->d_name, best) < 0))
			snprintf(best, sizeof(best), "%s", e->d_name);
	}
	closedir(d);
	if (!best[0])
		die(EXIT_SETUP, "no virtio-net device (1af4:1041) in /sys/bus/pci/devices");
	snprintf(D.bdf, sizeof(D.bdf), "%s", best);
}

static void unbind(void)
{
	char path[512], link[512];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver", D.bdf);
	ssize_t n = readlink(path, link, sizeof(link) - 1);
	if (n < 0)
		return; /* no driver bound */
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver/unbind", D.bdf);
	if (write_file(path, D.bdf))
		die(EXIT_SETUP, "unbind %s: %s", D.bdf, strerror(errno));
}

static uint8_t cfg8(unsigned off)
{
	uint8_t v = 0;
	if (pread(D.cfg_fd, &v, 1, D.cfg_base + off) != 1)
		die(EXIT_SETUP, "config read at %#x: %s", off, strerror(errno));
	return v;
}

static uint32_t cfg32(unsigned off)
{
	uint32_t v = 0;
	if (pread(D.cfg_fd, &v, 4, D.cfg_base + off) != 4)
		die(EXIT_SETUP, "config read at %#x: %s", off, strerror(errno));
	return v;
}

static uint16_t cfg16(unsigned off)
{
	uint16_t v = 0;
	if (pread(D.cfg_fd, &v, 2, D.cfg_base + off) != 2)
		die(EXIT_SETUP, "config read at %#x: %s", off, strerror(errno));
	return v;
}

static void sysfs_claim(void)
{
	unbind();
	char path[512];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/config", D.bdf);
	D.cfg_fd = open(path, O_RDWR);
	if (D.cfg_fd < 0)
		die(EXIT_SETUP, "open %s: %s", path, strerror(errno));
}

static void set_command(uint16_t set, uint16_t clear)
{
	uint16_t cmd = (uint16_t)((cfg16(4) | set) & ~clear);
	if (pwrite(D.cfg_fd, &cmd, 2, D.cfg_base + 4) != 2)
		die(EXIT_SETUP, "config write (command) failed: %s", strerror(errno));
}

/* Walk the capability list for virtio vendor caps (cfg_type 1..4 in BAR0). */
static void walk_caps(void)
{
	int have[5] = {0};
	if (!(cfg16(6) & 0x10))
		die(EXIT_SETUP, "%s: no capability list", D.bdf);
	unsigned pos = cfg8(0x34) & 0xfc;
	for (int guard = 0; pos && guard < 48; guard++) {
		uint8_t id = cfg8(pos), next = cfg8(pos + 1);
		if (id == 0x09) {
			uint8_t type = cfg8(pos + 3), bar = cfg8(pos + 4);
			uint32_t off = cfg32(pos + 8), len = cfg32(pos + 12);
			if (type >= 1 && type <= 4 && bar == 0 && !have[type]) {
				have[type] = 1;
				if (type == 1)
					D.common = off;
				else if (type == 2) {
					D.notify = off;
					D.notify_mult = cfg32(pos + 16);
				} else if (type == 3)
					D.isr = off;
				else
					D.device = off;
				(void)len;
			}
		}
		pos = next & 0xfc;
	}
	for (int t = 1; t <= 4; t++)
		if (!have[t])
			die(EXIT_SETUP, "%s: virtio vendor capability type %d (BAR0) missing", D.bdf, t);
}

static void sysfs_map_bar0(void)
{
	char path[512];
	struct stat st;
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/resource0", D.bdf);
	int fd = open(path, O_RDWR | O_SYNC);
	if (fd < 0)
		die(EXIT_SETUP, "open %s: %s", path, strerror(errno));
	if (fstat(fd, &st) || st.st_size <= 0)
		die(EXIT_SETUP, "%s: no size", path);
	D.bar0_len = (size_t)st.st_size;
	void *p = mmap(NULL, D.bar0_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED)
		die(EXIT_SETUP, "mmap %s: %s", path, strerror(errno));
	close(fd);
	D.bar0 = p;
}

/* ---- DMA memory ----------------------------------------------------------------------------- */

static void sysfs_alloc_dma(void)
{
	size_t len = (size_t)NPAGES * PAGE;
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
		       MAP_PRIVATE | MAP_ANONYMOUS | MAP_LOCKED | MAP_POPULATE, -1, 0);
	if (p == MAP_FAILED)
		die(EXIT_SETUP, "mmap DMA memory: %s", strerror(errno));
	if (mlock(p, len))
		die(EXIT_SETUP, "mlock: %s", strerror(errno));
	memset(p, 0, len);
	D.mem = p;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0)
		die(EXIT_SETUP, "open /proc/self/pagemap: %s", strerror(errno));
	for (unsigned i = 0; i < NPAGES; i++) {
		uint64_t e = 0;
		uintptr_t va = (uintptr_t)D.mem + (uintptr_t)i * PAGE;
		if (pread(fd, &e, 8, (off_t)(va / PAGE * 8)) != 8)
			die(EXIT_SETUP, "pagemap read: %s", strerror(errno));
		uint64_t pfn = e & ((1ull << 55) - 1);
		if (!(e >> 63) || !pfn)
			die(EXIT_SETUP, "page %u not present or no PFN (pagemap %#" PRIx64 "; root?)",
			    i, e);
		D.pa[i] = pfn * PAGE;
	}
	close(fd);
}

/* ---- vfio backend: the device behind the guest's IOMMU ------------------------------------ */

/* Far from guest RAM (512 MiB .. a few GiB) and below a 39-bit IOMMU address width: a ring or
 * buffer address the device gets without going through the IOMMU cannot alias one of ours. */
#define IOVA_BASE 0x1234500000ull

static void vfio_bind(void)
{
	char path[512], link[512];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver", D.bdf);
	ssize_t n = readlink(path, link, sizeof(link) - 1);
	if (n >= 0) {
		link[n] = 0;
		const char *drv = strrchr(link, '/');
		if (!strcmp(drv ? drv + 1 : link, "vfio-pci"))
			return;
		unbind();
	}
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver_override", D.bdf);
	if (write_file(path, "vfio-pci"))
		die(EXIT_SETUP, "%s: %s", path, strerror(errno));
	/* The probe fails quietly when vfio-pci is not loaded: the readlink below says so. */
	write_file("/sys/bus/pci/drivers_probe", D.bdf);
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver", D.bdf);
	n = readlink(path, link, sizeof(link) - 1);
	if (n < 0 || (link[n] = 0, !strstr(link, "/vfio-pci")))
		die(EXIT_SETUP, "%s did not bind to vfio-pci (modules vfio, vfio_iommu_type1, "
			"vfio-pci loaded? an IOMMU group?)", D.bdf);
}

static int vfio_ioctl(int fd, unsigned long req, void *arg, const char *what)
{
	int r = ioctl(fd, req, arg);
	if (r < 0)
		die(EXIT_SETUP, "vfio %s: %s", what, strerror(errno));
	return r;
}

static void vfio_region(unsigned index, struct vfio_region_info *ri)
{
	memset(ri, 0, sizeof(*ri));
	ri->argsz = sizeof(*ri);
	ri->index = index;
	vfio_ioctl(D.cfg_fd, VFIO_DEVICE_GET_REGION_INFO, ri, "DEVICE_GET_REGION_INFO");
}

static void vfio_claim(void)
{
	char path[512], link[512];
	vfio_bind();
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", D.bdf);
	ssize_t n = readlink(path, link, sizeof(link) - 1);
	if (n < 0)
		die(EXIT_SETUP, "%s: no IOMMU group (guest booted without intel_iommu=on?)", D.bdf);
	link[n] = 0;
	const char *grp = strrchr(link, '/');
	D.container = open("/dev/vfio/vfio", O_RDWR);
	if (D.container < 0)
		die(EXIT_SETUP, "open /dev/vfio/vfio: %s", strerror(errno));
	if (ioctl(D.container, VFIO_GET_API_VERSION) != VFIO_API_VERSION ||
	    ioctl(D.container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) != 1)
		die(EXIT_SETUP, "vfio: no API version %d with type1v2", VFIO_API_VERSION);
	char gpath[600];
	snprintf(gpath, sizeof(gpath), "/dev/vfio/%s", grp ? grp + 1 : link);
	D.group = open(gpath, O_RDWR);
	if (D.group < 0)
		die(EXIT_SETUP, "open %s: %s", gpath, strerror(errno));
	struct vfio_group_status gs = {.argsz = sizeof(gs)};
	vfio_ioctl(D.group, VFIO_GROUP_GET_STATUS, &gs, "GROUP_GET_STATUS");
	if (!(gs.flags & VFIO_GROUP_FLAGS_VIABLE))
		die(EXIT_SETUP, "%s not viable: another device of the group has a driver", gpath);
	vfio_ioctl(D.group, VFIO_GROUP_SET_CONTAINER, &D.container, "GROUP_SET_CONTAINER");
	if (ioctl(D.container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) < 0)
		die(EXIT_SETUP, "vfio SET_IOMMU type1v2: %s", strerror(errno));
	D.cfg_fd = vfio_ioctl(D.group, VFIO_GROUP_GET_DEVICE_FD, D.bdf, "GROUP_GET_DEVICE_FD");
	struct vfio_region_info ri;
	vfio_region(VFIO_PCI_CONFIG_REGION_INDEX, &ri);
	D.cfg_base = (off_t)ri.offset;
	D.vfio = 1;
}

static void vfio_map_bar0(void)
{
	struct vfio_region_info ri;
	vfio_region(VFIO_PCI_BAR0_REGION_INDEX, &ri);
	if (!(ri.flags & VFIO_REGION_INFO_FLAG_MMAP) || !ri.size)
		die(EXIT_SETUP, "vfio: BAR0 is not mmappable (flags %#x, %llu bytes)", ri.flags,
		    (unsigned long long)ri.size);
	D.bar0_len = (size_t)ri.size;
	void *p = mmap(NULL, D.bar0_len, PROT_READ | PROT_WRITE, MAP_SHARED, D.cfg_fd,
		       (off_t)ri.offset);
	if (p == MAP_FAILED)
		die(EXIT_SETUP, "mmap vfio BAR0: %s", strerror(errno));
	D.bar0 = p;
}

/* One mapping per page, so a single page can be unmapped later (type1v2 refuses to split). */
static void vfio_alloc_dma(void)
{
	size_t len = (size_t)NPAGES * PAGE;
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (p == MAP_FAILED)
		die(EXIT_SETUP, "mmap DMA memory: %s", strerror(errno));
	memset(p, 0, len);
	D.mem = p;
	for (unsigned i = 0; i < NPAGES; i++) {
		struct vfio_iommu_type1_dma_map m = {
			.argsz = sizeof(m),
			.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
			.vaddr = (uintptr_t)D.mem + (uintptr_t)i * PAGE,
			.iova = IOVA_BASE + (uint64_t)i * PAGE,
			.size = PAGE,
		};
		vfio_ioctl(D.container, VFIO_IOMMU_MAP_DMA, &m, "IOMMU_MAP_DMA"); /* pins the page */
		D.pa[i] = m.iova;
	}
}

static int vfio_unmap_page(uint64_t iova)
{
	struct vfio_iommu_type1_dma_unmap u = {.argsz = sizeof(u), .iova = iova, .size = PAGE};
	return ioctl(D.container, VFIO_IOMMU_UNMAP_DMA, &u);
}

/* ---- hardware access: the only place the two backends differ ------------------------------ */

struct hw {
	void (*claim)(void);     /* take the device from its driver; config space readable */
	void (*map_bar0)(void);  /* D.bar0, D.bar0_len */
	void (*alloc_dma)(void); /* D.mem and D.pa[]: NPAGES pages and their device addresses */
};
static const struct hw HW_SYSFS = {sysfs_claim, sysfs_map_bar0, sysfs_alloc_dma};
static const struct hw HW_VFIO = {vfio_claim, vfio_map_bar0, vfio_alloc_dma};
static const struct hw *hw = &HW_SYSFS;

static int bound_to_vfio(void)
{
	char path[512], link[512];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/driver", D.bdf);
	ssize_t n = readlink(path, link, sizeof(link) - 1);
	return n > 0 && (link[n] = 0, strstr(link, "/vfio-pci") != NULL);
}

static void alloc_dma(void) { hw->alloc_dma(); }

static uint8_t *page(uint64_t *pa)
{
	if (D.next_page >= NPAGES)
		die(EXIT_SETUP, "out of DMA pages");
	unsigned i = D.next_page++;
	*pa = D.pa[i];
	return D.mem + (size_t)i * PAGE;
}

/* ---- split ring accessors ------------------------------------------------------------------- */

static void desc_set(struct vq *q, unsigned i, uint64_t addr, uint32_t len, uint16_t flags,
		     uint16_t next)
{
	volatile uint8_t *d = q->desc + 16 * i;
	*(volatile uint64_t *)d = addr;
	*(volatile uint32_t *)(d + 8) = len;
	*(volatile uint16_t *)(d + 12) = flags;
	*(volatile uint16_t *)(d + 14) = next;
}

static void avail_put(struct vq *q, uint16_t head)
{
	*(volatile uint16_t *)(q->avail + 4 + 2 * (q->avail_idx % q->size)) = head;
	mb();
	q->avail_idx++;
	*(volatile uint16_t *)(q->avail + 2) = q->avail_idx;
	mb();
}

static void avail_set_idx(struct vq *q, uint16_t idx)
{
	mb();
	*(volatile uint16_t *)(q->avail + 2) = idx;
	mb();
}

static uint16_t used_idx(struct vq *q)
{
	mb();
	return *(volatile uint16_t *)(q->used + 2);
}

static void used_elem(struct vq *q, uint16_t n, uint32_t *id, uint32_t *len)
{
	volatile uint8_t *e = q->used + 4 + 8 * (n % q->size);
	*id = *(volatile uint32_t *)e;
	*len = *(volatile uint32_t *)(e + 4);
}

static void kick(struct vq *q)
{
	mb();
	*q->notify = (uint16_t)q->index;
	mb();
}

/* ---- device bring-up ------------------------------------------------------------------------ */

static int wait_status_zero(double secs)
{
	double end = now() + secs;
	while (status_rd() != 0) {
		if (now() > end)
			return -1;
		usleep(1000);
	}
	return 0;
}

static void dev_reset_quiet(void)
{
	if (!D.bar0 || !D.inited)
		return;
	status_wr(0);
	wait_status_zero(2.0);
}

static void open_device(void)
{
	find_device();
	if (O.vfio || bound_to_vfio())
		hw = &HW_VFIO;
	hw->claim();
	walk_caps();
	set_command(0x6, 0); /* memory space + bus master */
	hw->map_bar0();
	if (D.common + 64 > D.bar0_len || D.notify >= D.bar0_len || D.isr >= D.bar0_len ||
	    D.device + 6 > D.bar0_len)
		die(EXIT_SETUP, "capability offsets outside BAR0 (%zu bytes)", D.bar0_len);
}

static void setup_queue(struct vq *q, unsigned index)
{
	q->index = index;
	w16(D.common + C_QSEL, (uint16_t)index);
	unsigned max = r16(D.common + C_QSIZE);
	if (max == 0)
		die(EXIT_SETUP, "queue %u absent (size 0)", index);
	q->size = O.qsize < max ? O.qsize : max;
	w16(D.common + C_QSIZE, (uint16_t)q->size);
	q->desc = page(&q->desc_pa);
	q->avail = page(&q->avail_pa);
	q->used = page(&q->used_pa);
	for (unsigned i = 0; i < q->size; i++)
		q->buf[i] = page(&q->buf_pa[i]);
	q->avail_idx = q->last_used = 0;
	w64(D.common + C_QDESC, q->desc_pa);
	w64(D.common + C_QAVAIL, q->avail_pa);
	w64(D.common + C_QUSED, q->used_pa);
	w16(D.common + C_QMSIX, NO_VECTOR);
	unsigned noff = r16(D.common + C_QNOFF);
	uint64_t n = (uint64_t)D.notify + (uint64_t)noff * D.notify_mult;
	if (n + 2 > D.bar0_len)
		die(EXIT_SETUP, "queue %u notify address %#" PRIx64 " outside BAR0", index, n);
	q->notify = (volatile uint16_t *)(D.bar0 + n);
	/* Polling: ask for no interrupts. */
	*(volatile uint16_t *)q->avail = 1;
}

static void enable_queue(struct vq *q)
{
	w16(D.common + C_QSEL, (uint16_t)q->index);
	w16(D.common + C_QENABLE, 1);
	if (r16(D.common + C_QENABLE) != 1)
		die(EXIT_SETUP, "queue %u did not enable", q->index);
}

/* Reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK; queues are set up but not enabled. */
static void init_to_features_ok(uint64_t want)
{
	D.inited = 1;
	status_wr(0);
	if (wait_status_zero(5.0))
		die(EXIT_SETUP, "device status stuck at %#x after reset", status_rd());
	status_wr(ST_ACK);
	status_wr(ST_ACK | ST_DRIVER);
	w32(D.common + C_DFSEL, 0);
	uint64_t lo = r32(D.common + C_DF);
	w32(D.common + C_DFSEL, 1);
	uint64_t hi = r32(D.common + C_DF);
	uint64_t offered = lo | hi << 32;
	if (!(offered >> F_VERSION_1 & 1))
		die(EXIT_SETUP, "device does not offer VERSION_1 (features %#" PRIx64 ")", offered);
	D.features = offered & want;
	w32(D.common + C_GFSEL, 0);
	w32(D.common + C_GF, (uint32_t)D.features);
	w32(D.common + C_GFSEL, 1);
	w32(D.common + C_GF, (uint32_t)(D.features >> 32));
	status_wr(ST_ACK | ST_DRIVER | ST_FEATURES_OK);
	if (!(status_rd() & ST_FEATURES_OK))
		die(EXIT_SETUP, "device refused features %#" PRIx64 " (status %#x)", D.features,
		    status_rd());
	static const uint8_t dflt[6] = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
	memcpy(D.mac, dflt, 6);
	if (D.features >> F_MAC & 1)
		for (int i = 0; i < 6; i++)
			D.mac[i] = r8(D.device + (uint32_t)i);
	if (r16(D.common + C_NUMQ) < 2)
		die(EXIT_SETUP, "device has %u queues, need 2", r16(D.common + C_NUMQ));
	D.next_page = 0;
	memset(D.mem, 0, (size_t)NPAGES * PAGE);
	setup_queue(&D.q[0], 0);
	setup_queue(&D.q[1], 1);
}

static void post_rx_all(void)
{
	struct vq *q = &D.q[0];
	for (unsigned i = 0; i < q->size; i++) {
		desc_set(q, i, q->buf_pa[i], PAGE, D_WRITE, 0);
		avail_put(q, (uint16_t)i);
	}
}

static void driver_ok(void)
{
	status_wr(ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
	uint8_t s = status_rd();
	if ((s & (ST_DRIVER_OK | ST_NEEDS_RESET | ST_FAILED)) != ST_DRIVER_OK)
		die(EXIT_SETUP, "status %#x after DRIVER_OK", s);
}

static void full_init(void)
{
	init_to_features_ok((1ull << F_VERSION_1) | (1ull << F_MAC));
	enable_queue(&D.q[0]);
	enable_queue(&D.q[1]);
	post_rx_all();
	driver_ok();
	kick(&D.q[0]);
}

/* ---- frames --------------------------------------------------------------------------------- */

static const uint8_t BCAST[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
static uint8_t host_mac[6];
static uint64_t tx_frames, rx_frames, rx_other, arp_replies_sent;

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }
static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }
static void put32(uint8_t *p, uint32_t v) { put16(p, (uint16_t)(v >> 16)); put16(p + 2, (uint16_t)v); }
static uint32_t get32(const uint8_t *p) { return (uint32_t)get16(p) << 16 | get16(p + 2); }

static uint32_t csum_add(uint32_t sum, const uint8_t *p, size_t n)
{
	for (size_t i = 0; i + 1 < n; i += 2)
		sum += get16(p + i);
	if (n & 1)
		sum += (uint32_t)p[n - 1] << 8;
	return sum;
}

static uint16_t csum_fold(uint32_t sum)
{
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

/* Reclaim completed TX chains; returns the number outstanding. */
static unsigned tx_reap(void)
{
	struct vq *q = &D.q[1];
	uint16_t u = used_idx(q);
	if ((uint16_t)(u - q->last_used) > q->size)
		die(EXIT_VERIFY, "tx used.idx %u jumped past last seen %u (queue size %u)", u,
		    q->last_used, q->size);
	q->last_used = u;
	return (uint16_t)(q->avail_idx - q->last_used);
}

/* Send one frame (header + frame in one descriptor). */
static void tx_frame(const uint8_t *frame, size_t len)
{
	struct vq *q = &D.q[1];
	while (tx_reap() >= q->size) {
		check_deadline("tx ring full: the device does not complete TX chains");
		usleep(100);
	}
	unsigned slot = q->avail_idx % q->size;
	uint8_t *b = q->buf[slot];
	memset(b, 0, HDR_LEN); /* virtio_net_hdr_v1: flags 0, GSO_NONE, num_buffers 0 */
	memcpy(b + HDR_LEN, frame, len);
	desc_set(q, slot, q->buf_pa[slot], (uint32_t)(HDR_LEN + len), 0, 0);
	avail_put(q, (uint16_t)slot);
	kick(q);
	tx_frames++;
}

static void eth_head(uint8_t *f, const uint8_t *dst, uint16_t type)
{
	memcpy(f, dst, 6);
	memcpy(f + 6, D.mac, 6);
	put16(f + 12, type);
}

static size_t arp_build(uint8_t *f, uint16_t oper, const uint8_t *dst, const uint8_t *tha,
			uint32_t tpa)
{
	eth_head(f, dst, 0x0806);
	uint8_t *a = f + ETH_LEN;
	put16(a, 1);
	put16(a + 2, 0x0800);
	a[4] = 6;
	a[5] = 4;
	put16(a + 6, oper);
	memcpy(a + 8, D.mac, 6);
	put32(a + 14, O.addr_ip);
	memcpy(a + 18, tha, 6);
	put32(a + 24, tpa);
	return ETH_LEN + 28;
}

/* Frame handler: returns 1 if consumed as "interesting" by the caller's filter. */
typedef int (*rx_fn)(const uint8_t *frame, size_t len, void *ctx);

/* Answer ARP requests for our address (the host re-checks its neighbour entry). */
static int rx_common(const uint8_t *f, size_t len)
{
	if (len >= ETH_LEN + 28 && get16(f + 12) == 0x0806) {
		const uint8_t *a = f + ETH_LEN;
		if (get16(a + 6) == 1 && get32(a + 24) == O.addr_ip) {
			uint8_t r[64];
			size_t n = arp_build(r, 2, a + 8, a + 8, get32(a + 14));
			tx_frame(r, n);
			arp_replies_sent++;
			return 1;
		}
	}
	return 0;
}

/* Poll rx0 until fn returns nonzero or `until` passes; re-posts every buffer. Returns fn's
 * value, or 0 on time-out. */
static int rx_poll(rx_fn fn, void *ctx, double until)
{
	struct vq *q = &D.q[0];
	for (;;) {
		uint16_t u = used_idx(q);
		if ((uint16_t)(u - q->last_used) > q->size)
			die(EXIT_VERIFY, "rx used.idx %u jumped past last seen %u (queue size %u)", u,
			    q->last_used, q->size);
		while (q->last_used != u) {
			uint32_t id, len;
			mb();
			used_elem(q, q->last_used, &id, &len);
			q->last_used++;
			if (id >= q->size)
				die(EXIT_VERIFY, "rx used element id %u out of range", id);
			if (len < HDR_LEN || len > PAGE)
				die(EXIT_VERIFY, "rx used element len %u (header %u, buffer %u)", len,
				    HDR_LEN, PAGE);
			uint8_t frame[PAGE];
			const uint8_t *b = q->buf[id];
			uint16_t nb = (uint16_t)(b[10] | b[11] << 8);
			/* No GUEST_CSUM, GUEST_TSO*, MRG_RXBUF negotiated (5.1.6.4.1): no NEEDS_CSUM,
			 * GSO_NONE, one buffer. */
			if ((b[0] & 1) || b[1] != 0 || nb > 1)
				die(EXIT_VERIFY, "rx header: flags %#x gso_type %u num_buffers %u", b[0],
				    b[1], nb);
			size_t flen = len - HDR_LEN;
			memcpy(frame, b + HDR_LEN, flen);
			memset(q->buf[id], 0, PAGE);
			avail_put(q, (uint16_t)id);
			kick(q);
			rx_frames++;
			if (rx_common(frame, flen))
				continue;
			int r = fn(frame, flen, ctx);
			if (r)
				return r;
			rx_other++;
		}
		if (status_rd() & ST_NEEDS_RESET)
			die(EXIT_VERIFY, "device set NEEDS_RESET (status %#x)", status_rd());
		if (now() > until)
			return 0;
		check_deadline("waiting for a frame");
		tx_reap();
		usleep(50);
	}
}

static int rx_arp_reply(const uint8_t *f, size_t len, void *ctx)
{
	(void)ctx;
	if (len < ETH_LEN + 28 || get16(f + 12) != 0x0806)
		return 0;
	const uint8_t *a = f + ETH_LEN;
	if (get16(a + 6) != 2 || get32(a + 14) != O.host_ip)
		return 0;
	if (get16(a) != 1 || get16(a + 2) != 0x0800 || a[4] != 6 || a[5] != 4)
		die(EXIT_VERIFY, "ARP reply with bad hardware/protocol fields");
	if (memcmp(a + 18, D.mac, 6) || get32(a + 24) != O.addr_ip)
		die(EXIT_VERIFY, "ARP reply not addressed to us");
	if (memcmp(f, D.mac, 6))
		die(EXIT_VERIFY, "ARP reply's Ethernet destination is not our MAC");
	if (memcmp(f + 6, a + 8, 6))
		die(EXIT_VERIFY, "ARP reply: Ethernet source differs from sender hardware address");
	memcpy(host_mac, a + 8, 6);
	return 1;
}

static void do_arp(unsigned *tries)
{
	static const uint8_t zero[6];
	uint8_t f[64];
	for (*tries = 1; *tries <= O.max_retries; (*tries)++) {
		size_t n = arp_build(f, 1, BCAST, zero, O.host_ip);
		tx_frame(f, n);
		if (rx_poll(rx_arp_reply, NULL, now() + O.rto_ms / 1000.0 * 2))
			return;
		check_deadline("ARP");
	}
	die(EXIT_TIMEOUT, "no ARP reply for the host after %u requests", O.max_retries);
}

#define SRC_PORT 40000u

static size_t udp_build(uint8_t *f, const uint8_t *payload, size_t plen, uint16_t ip_id)
{
	eth_head(f, host_mac, 0x0800);
	uint8_t *ip = f + ETH_LEN, *udp = ip + 20;
	ip[0] = 0x45;
	ip[1] = 0;
	put16(ip + 2, (uint16_t)(20 + 8 + plen));
	put16(ip + 4, ip_id);
	put16(ip + 6, 0x4000);
	ip[8] = 64;
	ip[9] = 17;
	put16(ip + 10, 0);
	put32(ip + 12, O.addr_ip);
	put32(ip + 16, O.host_ip);
	put16(ip + 10, csum_fold(csum_add(0, ip, 20)));
	put16(udp, SRC_PORT);
	put16(udp + 2, (uint16_t)O.port);
	put16(udp + 4, (uint16_t)(8 + plen));
	put16(udp + 6, 0);
	memcpy(udp + 8, payload, plen);
	uint32_t s = csum_add(0, ip + 12, 8);
	s += 17 + (uint32_t)(8 + plen);
	s = csum_add(s, udp, 8 + plen);
	uint16_t c = csum_fold(s);
	put16(udp + 6, c ? c : 0xffff);
	return ETH_LEN + 20 + 8 + plen;
}

struct echo_ctx {
	const uint8_t *want;
	size_t want_len;
	uint64_t bad;
	char why[160];
};

static int rx_udp_echo(const uint8_t *f, size_t len, void *vctx)
{
	struct echo_ctx *c = vctx;
	if (len < ETH_LEN + 28 || get16(f + 12) != 0x0800)
		return 0;
	const uint8_t *ip = f + ETH_LEN;
	if (ip[0] != 0x45 || ip[9] != 17 || get32(ip + 12) != O.host_ip || get32(ip + 16) != O.addr_ip)
		return 0;
	const uint8_t *udp = ip + 20;
	if (get16(udp) != O.port || get16(udp + 2) != SRC_PORT)
		return 0;
	size_t tot = get16(ip + 2);
	const char *why = NULL;
	if (memcmp(f, D.mac, 6) || memcmp(f + 6, host_mac, 6))
		why = "Ethernet addresses";
	else if (tot < 28 || ETH_LEN + tot > len)
		why = "IP total length";
	else if (csum_fold(csum_add(0, ip, 20)) != 0)
		why = "IP header checksum";
	else if (get16(udp + 4) != tot - 20)
		why = "UDP length";
	else if (get16(udp + 6)) {
		uint32_t s = csum_add(0, ip + 12, 8);
		s += 17 + (uint32_t)(tot - 20);
		s = csum_add(s, udp, tot - 20);
		if (csum_fold(s) != 0)
			why = "UDP checksum";
	}
	if (!why) {
		size_t plen = tot - 28;
		if (plen != c->want_len || memcmp(udp + 8, c->want, plen)) {
			/* A late echo of an earlier datagram (after a retransmit) is not an error. */
			return 0;
		}
		return 1;
	}
	c->bad++;
	snprintf(c->why, sizeof(c->why), "bad echo: %s", why);
	return 0;
}

static int cmd_udp_echo(void)
{
	unsigned arp_tries;
	double t0 = now();
	full_init();
	do_arp(&arp_tries);
	uint8_t payload[UDP_MAX_PAYLOAD], f[2048];
	uint64_t ok = 0, retrans = 0, bytes = 0;
	struct echo_ctx c = {.want = payload};
	for (uint64_t i = O.first; i < O.first + O.count; i++) {
		size_t plen = udp_payload(O.seed, i, payload);
		c.want_len = plen;
		size_t n = udp_build(f, payload, plen, (uint16_t)i);
		unsigned k;
		for (k = 0; k <= O.max_retries; k++) {
			if (k)
				retrans++;
			tx_frame(f, n);
			if (rx_poll(rx_udp_echo, &c, now() + O.rto_ms / 1000.0))
				break;
			check_deadline("UDP echo");
		}
		if (k > O.max_retries)
			die(EXIT_TIMEOUT, "no echo of datagram %" PRIu64 " after %u retries", i,
			    O.max_retries);
		ok++;
		bytes += plen;
	}
	while (tx_reap()) {
		check_deadline("waiting for the last TX completions");
		usleep(100);
	}
	uint8_t st = status_rd();
	out("mode=udp-echo backend=%s rx0_desc=%#" PRIx64 " bdf=%s features=%#" PRIx64
	    " queue_size=%u host_mac=%02x:%02x:%02x:%02x:%02x:%02x"
	    " arp_tries=%u sent=%" PRIu64 " echoes_ok=%" PRIu64 " echoes_bad=%" PRIu64
	    " retransmits=%" PRIu64 " bytes=%" PRIu64 " tx_frames=%" PRIu64 " rx_frames=%" PRIu64
	    " rx_other=%" PRIu64 " arp_replies_sent=%" PRIu64 " status=%#x seconds=%.3f",
	    D.vfio ? "vfio" : "sysfs", D.q[0].desc_pa, D.bdf, D.features, D.q[0].size, host_mac[0], host_mac[1], host_mac[2], host_mac[3],
	    host_mac[4], host_mac[5], arp_tries, O.count, ok, c.bad, retrans, bytes, tx_frames,
	    rx_frames, rx_other, arp_replies_sent, st, now() - t0);
	dev_reset_quiet();
	if (c.bad)
		die(EXIT_VERIFY, "%" PRIu64 " bad echoes (last: %s)", c.bad, c.why);
	return 0;
}

static int cmd_arp(void)
{
	unsigned tries;
	full_init();
	do_arp(&tries);
	out("mode=arp bdf=%s host_mac=%02x:%02x:%02x:%02x:%02x:%02x arp_tries=%u tx_frames=%" PRIu64
	    " rx_frames=%" PRIu64 " status=%#x",
	    D.bdf, host_mac[0], host_mac[1], host_mac[2], host_mac[3], host_mac[4], host_mac[5],
	    tries, tx_frames, rx_frames, status_rd());
	dev_reset_quiet();
	return 0;
}

/* ---- hostile cases -------------------------------------------------------------------------- */

/* Each case builds a malformed TX (or RX) submission after a normal init, kicks, and reports
 * what the device did. The expected reaction (virtio 1.3, 2.7 and 4.1) is in `expect`. */
enum { S_LIVE, S_LIVE_INDIRECT, S_NONE };

struct hcase {
	const char *name;
	const char *expect;
	void (*fn)(void);
	int setup; /* S_LIVE: initialised, queues enabled, DRIVER_OK, RX empty; S_NONE: reset only */
};

/* What a case saw of the device's reaction besides status and rings ("-" if nothing). */
static char obs[160] = "-";

static uint64_t guest_ram_end_guess(void)
{
	/* Far above any RAM this guest has (512 MiB .. a few GiB): 1 TiB. */
	return 1ull << 40;
}

static void tx_chain_submit(uint16_t head)
{
	struct vq *q = &D.q[1];
	avail_put(q, head);
	kick(q);
}

static void h_addr_outside_ram(void)
{
	struct vq *q = &D.q[1];
	desc_set(q, 0, guest_ram_end_guess(), 64, 0, 0);
	tx_chain_submit(0);
}

static void h_addr_len_overflow(void)
{
	struct vq *q = &D.q[1];
	desc_set(q, 0, 0xfffffffffffff000ull, 0x2000, 0, 0);
	tx_chain_submit(0);
}

static void h_zero_len(void)
{
	struct vq *q = &D.q[1];
	desc_set(q, 0, q->buf_pa[0], 0, 0, 0);
	tx_chain_submit(0);
}

static void h_next_out_of_range(void)
{
	struct vq *q = &D.q[1];
	memset(q->buf[0], 0, HDR_LEN);
	desc_set(q, 0, q->buf_pa[0], HDR_LEN, D_NEXT, (uint16_t)(q->size + 3));
	tx_chain_submit(0);
}

static void h_next_loop(void)
{
	struct vq *q = &D.q[1];
	desc_set(q, 0, q->buf_pa[0], HDR_LEN, D_NEXT, 1);
	desc_set(q, 1, q->buf_pa[1], 64, D_NEXT, 0);
	tx_chain_submit(0);
}

static void h_head_out_of_range(void)
{
	tx_chain_submit((uint16_t)(D.q[1].size + 5));
}

static void h_avail_jump(void)
{
	struct vq *q = &D.q[1];
	desc_set(q, 0, q->buf_pa[0], HDR_LEN + 60, 0, 0);
	q->avail_idx = (uint16_t)(q->size + 7);
	avail_set_idx(q, q->avail_idx);
	kick(q);
}

static void h_writable_tx(void)
{
	struct vq *q = &D.q[1];
	desc_set(q, 0, q->buf_pa[0], HDR_LEN + 60, D_WRITE, 0);
	tx_chain_submit(0);
}

static void h_short_frame(void)
{
	struct vq *q = &D.q[1];
	desc_set(q, 0, q->buf_pa[0], HDR_LEN - 4, 0, 0);
	tx_chain_submit(0);
}

static void h_chain_longer_than_queue(void)
{
	/* Every descriptor points to the next, the last back to 0: longer than the queue. */
	struct vq *q = &D.q[1];
	for (unsigned i = 0; i < q->size; i++)
		desc_set(q, i, q->buf_pa[i], 16, D_NEXT, (uint16_t)((i + 1) % q->size));
	tx_chain_submit(0);
}

static void h_indirect_unnegotiated(void)
{
	struct vq *q = &D.q[1];
	desc_set(q, 0, q->buf_pa[0], 16, D_INDIRECT, 0);
	desc_set(q, 1, 0, 0, 0, 0);
	/* the table: one valid descriptor */
	*(uint64_t *)q->buf[0] = q->buf_pa[1];
	*(uint32_t *)(q->buf[0] + 8) = HDR_LEN + 60;
	tx_chain_submit(0);
}

static void h_readonly_rx(void)
{
	/* An RX buffer without WRITE: the device cannot put a frame there. Post it, then
	 * make the host send us something (ARP request). */
	struct vq *rx = &D.q[0];
	desc_set(rx, 0, rx->buf_pa[0], PAGE, 0, 0);
	avail_put(rx, 0);
	kick(rx);
	static const uint8_t zero[6];
	uint8_t f[64];
	size_t n = arp_build(f, 1, BCAST, zero, O.host_ip);
	tx_frame(f, n);
}

#define F_INDIRECT 28
#define F_RING_PACKED 34

/* A well-formed ARP request for the host in TX buffer `slot` (header included); its length. */
static uint32_t arp_in_buf(struct vq *q, unsigned slot)
{
	static const uint8_t zero[6];
	uint8_t f[64];
	size_t n = arp_build(f, 1, BCAST, zero, O.host_ip);
	memset(q->buf[slot], 0, HDR_LEN);
	memcpy(q->buf[slot] + HDR_LEN, f, n);
	return (uint32_t)(HDR_LEN + n);
}

static void itable(struct vq *q, unsigned slot, unsigned i, uint64_t addr, uint32_t len,
		   uint16_t flags, uint16_t next)
{
	uint8_t *e = q->buf[slot] + 16 * i;
	memcpy(e, &addr, 8);
	memcpy(e + 8, &len, 4);
	memcpy(e + 12, &flags, 2);
	memcpy(e + 14, &next, 2);
}

static void h_indirect_loop(void)
{
	struct vq *q = &D.q[1];
	uint32_t n = arp_in_buf(q, 1);
	itable(q, 0, 0, q->buf_pa[1], n, D_NEXT, 1);
	itable(q, 0, 1, q->buf_pa[2], 16, D_NEXT, 0);
	desc_set(q, 0, q->buf_pa[0], 32, D_INDIRECT, 0);
	tx_chain_submit(0);
}

static void h_indirect_in_indirect(void)
{
	struct vq *q = &D.q[1];
	uint32_t n = arp_in_buf(q, 1);
	itable(q, 2, 0, q->buf_pa[1], n, 0, 0);
	itable(q, 0, 0, q->buf_pa[2], 16, D_INDIRECT, 0);
	desc_set(q, 0, q->buf_pa[0], 16, D_INDIRECT, 0);
	tx_chain_submit(0);
}

static void h_indirect_with_next(void)
{
	struct vq *q = &D.q[1];
	uint32_t n = arp_in_buf(q, 1);
	itable(q, 0, 0, q->buf_pa[1], n, 0, 0);
	desc_set(q, 0, q->buf_pa[0], 16, D_INDIRECT | D_NEXT, 1);
	desc_set(q, 1, q->buf_pa[2], 16, 0, 0);
	tx_chain_submit(0);
}

static void h_indirect_len_odd(void)
{
	struct vq *q = &D.q[1];
	uint32_t n = arp_in_buf(q, 1);
	itable(q, 0, 0, q->buf_pa[1], n, 0, 0);
	desc_set(q, 0, q->buf_pa[0], 20, D_INDIRECT, 0);
	tx_chain_submit(0);
}

static void h_indirect_len_zero(void)
{
	struct vq *q = &D.q[1];
	desc_set(q, 0, q->buf_pa[0], 0, D_INDIRECT, 0);
	tx_chain_submit(0);
}

static void h_writable_before_readable_rx(void)
{
	struct vq *rx = &D.q[0];
	desc_set(rx, 0, rx->buf_pa[0], PAGE, D_WRITE | D_NEXT, 1);
	desc_set(rx, 1, rx->buf_pa[1], PAGE, 0, 0);
	avail_put(rx, 0);
	kick(rx);
	static const uint8_t zero[6];
	uint8_t f[64];
	size_t n = arp_build(f, 1, BCAST, zero, O.host_ip);
	tx_frame(f, n);
}

static void h_same_head_twice(void)
{
	struct vq *q = &D.q[1];
	desc_set(q, 0, q->buf_pa[0], arp_in_buf(q, 0), 0, 0);
	avail_put(q, 0);
	avail_put(q, 0);
	kick(q);
}

static void h_frame_over_64k(void)
{
	/* One descriptor of 70000 bytes from our buffer on: guest RAM the device may read. */
	struct vq *q = &D.q[1];
	arp_in_buf(q, 0);
	desc_set(q, 0, q->buf_pa[0], 70000, 0, 0);
	tx_chain_submit(0);
}

static void h_gso_bad_type(void)
{
	struct vq *q = &D.q[1];
	uint32_t n = arp_in_buf(q, 0);
	q->buf[0][1] = 0x42; /* gso_type */
	desc_set(q, 0, q->buf_pa[0], n, 0, 0);
	tx_chain_submit(0);
}

static void h_csum_unnegotiated(void)
{
	struct vq *q = &D.q[1];
	uint32_t n = arp_in_buf(q, 0);
	uint8_t *h = q->buf[0];
	h[0] = 1; /* NEEDS_CSUM without VIRTIO_NET_F_CSUM, csum_start past the frame */
	h[6] = 0xd0;
	h[7] = 0x07; /* csum_start 2000 */
	h[8] = 6;
	desc_set(q, 0, q->buf_pa[0], n, 0, 0);
	tx_chain_submit(0);
}

static void h_gso_unnegotiated_hdr_len(void)
{
	struct vq *q = &D.q[1];
	uint32_t n = arp_in_buf(q, 0);
	uint8_t *h = q->buf[0];
	h[1] = 1; /* GSO_TCPV4, never negotiated */
	h[2] = 0x0f;
	h[3] = 0x27; /* hdr_len 9999 */
	h[4] = 0x10; /* gso_size 16 */
	desc_set(q, 0, q->buf_pa[0], n, 0, 0);
	tx_chain_submit(0);
}

static void h_notify_absent_queue(void)
{
	uint64_t off = (uint64_t)D.notify + 7ull * D.notify_mult;
	if (off + 2 > D.bar0_len)
		die(EXIT_SETUP, "queue 7's doorbell would lie outside BAR0");
	*(volatile uint16_t *)(D.bar0 + off) = 7;
	mb();
	snprintf(obs, sizeof(obs), "numq=%u", r16(D.common + C_NUMQ));
}

static void h_bar_wrong_width(void)
{
	uint32_t v = r32(D.common + C_STATUS); /* status is a 1-byte field */
	snprintf(obs, sizeof(obs), "status_as_u32=%#x", v);
}

static void h_bar_gap_read(void)
{
	uint32_t gap = D.isr + 0x800; /* between ISR and the device config */
	if (gap + 4 > D.bar0_len)
		die(EXIT_SETUP, "no gap in BAR0");
	snprintf(obs, sizeof(obs), "gap_read=%#x", r32(gap));
}

static void h_clear_bus_master(void)
{
	struct vq *q = &D.q[1];
	set_command(0, 0x4);
	desc_set(q, 0, q->buf_pa[0], arp_in_buf(q, 0), 0, 0);
	tx_chain_submit(0);
	usleep(300000);
	uint16_t off = used_idx(q);
	set_command(0x4, 0);
	kick(q);
	double end = now() + 2;
	while (used_idx(q) == off && now() < end)
		usleep(1000);
	snprintf(obs, sizeof(obs), "used_without_bme=%u used_after_bme=%u", off, used_idx(q));
}

static void h_reset_in_flight(void)
{
	post_rx_all();
	kick(&D.q[0]);
	struct vq *q = &D.q[1];
	desc_set(q, 0, q->buf_pa[0], arp_in_buf(q, 0), 0, 0);
	tx_chain_submit(0);
	status_wr(0);
	int ok = wait_status_zero(5.0) == 0;
	snprintf(obs, sizeof(obs), "reset_done=%d", ok);
}

static void h_msix_vector_out_of_range(void)
{
	w16(D.common + C_QSEL, 0);
	w16(D.common + C_QMSIX, 99);
	snprintf(obs, sizeof(obs), "vector=%#x", r16(D.common + C_QMSIX));
}

static void h_change_addr_after_enable(void)
{
	w16(D.common + C_QSEL, 1);
	w32(D.common + C_QDESC, 0x1000);
	uint32_t lo = r32(D.common + C_QDESC);
	snprintf(obs, sizeof(obs), "desc_unchanged=%d", lo == (uint32_t)D.q[1].desc_pa);
}

/* ---- transport cases: start from a reset device ---- */

static void ack_driver(void)
{
	D.inited = 1;
	status_wr(0);
	if (wait_status_zero(5.0))
		die(EXIT_SETUP, "status stuck at %#x after reset", status_rd());
	status_wr(ST_ACK);
	status_wr(ST_ACK | ST_DRIVER);
}

static void write_features(uint64_t f)
{
	w32(D.common + C_GFSEL, 0);
	w32(D.common + C_GF, (uint32_t)f);
	w32(D.common + C_GFSEL, 1);
	w32(D.common + C_GF, (uint32_t)(f >> 32));
}

static void h_queue_size_not_pow2(void)
{
	init_to_features_ok(1ull << F_VERSION_1);
	w16(D.common + C_QSEL, 0);
	w16(D.common + C_QSIZE, 15);
	snprintf(obs, sizeof(obs), "size=%u", r16(D.common + C_QSIZE));
}

static void h_queue_size_zero(void)
{
	init_to_features_ok(1ull << F_VERSION_1);
	w16(D.common + C_QSEL, 0);
	w16(D.common + C_QSIZE, 0);
	snprintf(obs, sizeof(obs), "size=%u", r16(D.common + C_QSIZE));
}

static void h_driver_ok_before_features_ok(void)
{
	ack_driver();
	write_features(1ull << F_VERSION_1);
	status_wr(ST_ACK | ST_DRIVER | ST_DRIVER_OK);
	snprintf(obs, sizeof(obs), "driver_ok=%d", !!(status_rd() & ST_DRIVER_OK));
}

static void h_unoffered_feature(void)
{
	ack_driver();
	w32(D.common + C_DFSEL, 1);
	uint32_t hi = r32(D.common + C_DF);
	if (hi >> (F_RING_PACKED - 32) & 1)
		die(EXIT_SETUP, "the device offers RING_PACKED: pick another unoffered bit");
	write_features(1ull << F_VERSION_1 | 1ull << F_RING_PACKED);
	status_wr(ST_ACK | ST_DRIVER | ST_FEATURES_OK);
	snprintf(obs, sizeof(obs), "features_ok=%d", !!(status_rd() & ST_FEATURES_OK));
}

static void h_features_after_features_ok(void)
{
	init_to_features_ok(1ull << F_VERSION_1);
	w32(D.common + C_GFSEL, 0);
	w32(D.common + C_GF, 1u << F_MAC);
	w32(D.common + C_GFSEL, 0);
	snprintf(obs, sizeof(obs), "driver_features_lo=%#x", r32(D.common + C_GF));
}

static void h_enable_before_features_ok(void)
{
	ack_driver();
	D.next_page = 0;
	setup_queue(&D.q[0], 0);
	w16(D.common + C_QENABLE, 1);
	snprintf(obs, sizeof(obs), "enable=%u", r16(D.common + C_QENABLE));
}

static void h_avail_idx_backwards(void)
{
	struct vq *q = &D.q[1];
	desc_set(q, 0, q->buf_pa[0], arp_in_buf(q, 0), 0, 0);
	tx_chain_submit(0);
	double end = now() + 2;
	while (used_idx(q) != 1 && now() < end)
		usleep(1000);
	q->avail_idx = 0;
	avail_set_idx(q, 0);
	kick(q);
}

static void h_len_past_region(void)
{
	struct vq *q = &D.q[1];
	desc_set(q, 0, q->buf_pa[0], 0xfffff000u, 0, 0);
	tx_chain_submit(0);
}

static void h_msix_config_out_of_range(void)
{
	w16(D.common + C_MSIX, 99);
	snprintf(obs, sizeof(obs), "msix_config=%#x", r16(D.common + C_MSIX));
}

static void h_status_clear_bits(void)
{
	status_wr(ST_ACK | ST_DRIVER); /* clears FEATURES_OK and DRIVER_OK without a reset */
	snprintf(obs, sizeof(obs), "status_after=%#x", status_rd());
}

static void h_queue_select_absent(void)
{
	w16(D.common + C_QSEL, 9);
	w16(D.common + C_QSIZE, 16);
	snprintf(obs, sizeof(obs), "absent_size=%u", r16(D.common + C_QSIZE));
}

static void h_device_cfg_write(void)
{
	uint8_t before = r8(D.device);
	w8(D.device, (uint8_t)(before ^ 0xff));
	snprintf(obs, sizeof(obs), "mac0_unchanged=%d", r8(D.device) == before);
}

static void h_feature_dword_2(void)
{
	ack_driver();
	write_features(1ull << F_VERSION_1);
	w32(D.common + C_GFSEL, 2);
	w32(D.common + C_GF, 1);
	status_wr(ST_ACK | ST_DRIVER | ST_FEATURES_OK);
	snprintf(obs, sizeof(obs), "features_ok=%d", !!(status_rd() & ST_FEATURES_OK));
}

static void h_kick_before_driver_ok(void)
{
	init_to_features_ok(1ull << F_VERSION_1);
	enable_queue(&D.q[0]);
	enable_queue(&D.q[1]);
	struct vq *q = &D.q[1];
	desc_set(q, 0, q->buf_pa[0], arp_in_buf(q, 0), 0, 0);
	tx_chain_submit(0);
	usleep(300000);
	uint16_t before = used_idx(q);
	driver_ok();
	double end = now() + 2;
	while (used_idx(q) == before && now() < end)
		usleep(1000);
	snprintf(obs, sizeof(obs), "used_before_driver_ok=%u used_after=%u", before, used_idx(q));
}

/* S_NONE cases that set up both queues, then bend one thing before enabling them. */
static void live_from(void (*bend)(void))
{
	init_to_features_ok(1ull << F_VERSION_1);
	bend();
	enable_queue(&D.q[0]);
	w16(D.common + C_QSEL, 1);
	w16(D.common + C_QENABLE, 1);
	unsigned en = r16(D.common + C_QENABLE);
	snprintf(obs, sizeof(obs), "tx_enabled=%u", en);
	if (!en || (status_rd() & ST_NEEDS_RESET))
		return; /* refused at enable: the reaction to report */
	driver_ok();
	struct vq *q = &D.q[1];
	desc_set(q, 0, q->buf_pa[0], arp_in_buf(q, 0), 0, 0);
	tx_chain_submit(0);
}

static void bend_unaligned(void)
{
	struct vq *q = &D.q[1];
	q->desc += 8; /* the table at +8 (16 required), the used ring at +2 (4 required) */
	q->desc_pa += 8;
	q->used += 2;
	q->used_pa += 2;
	w16(D.common + C_QSEL, 1);
	w64(D.common + C_QDESC, q->desc_pa);
	w64(D.common + C_QUSED, q->used_pa);
}

static void bend_overlap(void)
{
	struct vq *q = &D.q[1];
	q->used = q->avail; /* the used ring on top of the avail ring */
	q->used_pa = q->avail_pa;
	w16(D.common + C_QSEL, 1);
	w64(D.common + C_QUSED, q->used_pa);
}

static void h_unaligned_rings(void) { live_from(bend_unaligned); }
static void h_overlapping_rings(void) { live_from(bend_overlap); }

static void h_notify_disabled_queue(void)
{
	init_to_features_ok(1ull << F_VERSION_1);
	enable_queue(&D.q[0]);
	driver_ok();
	struct vq *q = &D.q[1];
	desc_set(q, 0, q->buf_pa[0], arp_in_buf(q, 0), 0, 0);
	tx_chain_submit(0); /* tx0 never enabled */
	usleep(300000);
	w16(D.common + C_QSEL, 1);
	snprintf(obs, sizeof(obs), "tx_enabled=%u", r16(D.common + C_QENABLE));
}

/* Behind the vIOMMU: the guest's IOMMU unmaps a buffer the device holds (it is in the avail
 * ring of an enabled queue), then DRIVER_OK and the kick. The device must not reach the page
 * (the IOVA is no longer in its domain: refused and counted, NEEDS_RESET) and must survive.
 * Why before DRIVER_OK: a live device may take an available buffer at any time, kick or not
 * (2.7.13), so unmapping it after DRIVER_OK races with a legal use; before DRIVER_OK the device
 * must not use it (3.1.1), so it is held and unused until the unmap is done. */
static void h_unmap_held_buffer(void)
{
	struct vq *q = &D.q[1];
	if (!D.vfio)
		die(EXIT_NA, "not applicable: needs the vfio backend (--vfio behind a vIOMMU)");
	init_to_features_ok((1ull << F_VERSION_1) | (1ull << F_MAC));
	enable_queue(&D.q[0]);
	enable_queue(q);
	desc_set(q, 0, q->buf_pa[0], arp_in_buf(q, 0), 0, 0);
	avail_put(q, 0);
	int r = vfio_unmap_page(q->buf_pa[0]);
	int e = errno;
	/* Not driver_ok(): the device may look at the ring at once and set NEEDS_RESET. */
	status_wr(ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
	kick(q);
	snprintf(obs, sizeof(obs), "unmapped=%d iova=%#" PRIx64 "%s%s", r == 0, q->buf_pa[0],
		 r ? " unmap_error=" : "", r ? strerror(e) : "");
}

static const struct hcase CASES[] = {
	{"addr-outside-ram", "needs_reset", h_addr_outside_ram, S_LIVE},
	{"addr-len-overflow", "needs_reset", h_addr_len_overflow, S_LIVE},
	{"zero-len", "needs_reset_or_drop", h_zero_len, S_LIVE},
	{"next-out-of-range", "needs_reset", h_next_out_of_range, S_LIVE},
	{"next-loop", "needs_reset", h_next_loop, S_LIVE},
	{"chain-longer-than-queue", "needs_reset", h_chain_longer_than_queue, S_LIVE},
	{"head-out-of-range", "needs_reset", h_head_out_of_range, S_LIVE},
	{"avail-idx-jump", "needs_reset", h_avail_jump, S_LIVE},
	{"writable-tx", "needs_reset", h_writable_tx, S_LIVE},
	{"short-frame", "needs_reset_or_drop", h_short_frame, S_LIVE},
	{"indirect-unnegotiated", "needs_reset", h_indirect_unnegotiated, S_LIVE},
	{"readonly-rx", "needs_reset", h_readonly_rx, S_LIVE},
	{"indirect-loop", "needs_reset", h_indirect_loop, S_LIVE_INDIRECT},
	{"indirect-in-indirect", "needs_reset", h_indirect_in_indirect, S_LIVE_INDIRECT},
	{"indirect-with-next", "needs_reset", h_indirect_with_next, S_LIVE_INDIRECT},
	{"indirect-len-not-16", "needs_reset", h_indirect_len_odd, S_LIVE_INDIRECT},
	{"indirect-len-zero", "needs_reset", h_indirect_len_zero, S_LIVE_INDIRECT},
	{"writable-before-readable-rx", "needs_reset", h_writable_before_readable_rx, S_LIVE},
	{"same-head-twice", "needs_reset_or_ignore", h_same_head_twice, S_LIVE},
	{"frame-over-64k", "needs_reset_or_drop", h_frame_over_64k, S_LIVE},
	{"gso-bad-type", "needs_reset_or_drop", h_gso_bad_type, S_LIVE},
	{"csum-unnegotiated", "needs_reset_or_drop", h_csum_unnegotiated, S_LIVE},
	{"gso-unnegotiated-hdr-len", "needs_reset_or_drop", h_gso_unnegotiated_hdr_len, S_LIVE},
	{"notify-absent-queue", "ignore", h_notify_absent_queue, S_LIVE},
	{"bar-wrong-width", "ignore", h_bar_wrong_width, S_LIVE},
	{"bar-gap-read", "ignore", h_bar_gap_read, S_LIVE},
	{"clear-bus-master", "no_dma_without_bme", h_clear_bus_master, S_LIVE},
	{"reset-in-flight", "reset", h_reset_in_flight, S_LIVE},
	{"msix-vector-out-of-range", "ignore", h_msix_vector_out_of_range, S_LIVE},
	{"change-addr-after-enable", "ignore", h_change_addr_after_enable, S_LIVE},
	{"queue-size-not-pow2", "ignore", h_queue_size_not_pow2, S_NONE},
	{"queue-size-zero", "ignore", h_queue_size_zero, S_NONE},
	{"driver-ok-before-features-ok", "ignore", h_driver_ok_before_features_ok, S_NONE},
	{"unoffered-feature", "refuse_features", h_unoffered_feature, S_NONE},
	{"features-after-features-ok", "ignore", h_features_after_features_ok, S_NONE},
	{"enable-before-features-ok", "ignore", h_enable_before_features_ok, S_NONE},
	{"avail-idx-backwards", "needs_reset", h_avail_idx_backwards, S_LIVE},
	{"len-past-region", "needs_reset", h_len_past_region, S_LIVE},
	{"msix-config-out-of-range", "ignore", h_msix_config_out_of_range, S_LIVE},
	{"status-clear-bits", "ignore_or_counted", h_status_clear_bits, S_LIVE},
	{"queue-select-absent", "ignore", h_queue_select_absent, S_LIVE},
	{"device-cfg-write", "ignore", h_device_cfg_write, S_LIVE},
	{"feature-dword-2", "refuse_features", h_feature_dword_2, S_NONE},
	{"kick-before-driver-ok", "no_use_before_driver_ok", h_kick_before_driver_ok, S_NONE},
	{"unaligned-rings", "needs_reset", h_unaligned_rings, S_NONE},
	{"overlapping-rings", "unspecified_survive", h_overlapping_rings, S_NONE},
	{"notify-disabled-queue", "ignore", h_notify_disabled_queue, S_NONE},
	{"unmap-held-buffer", "needs_reset", h_unmap_held_buffer, S_NONE},
};
#define NCASES (sizeof(CASES) / sizeof(CASES[0]))

static int cmd_hostile(const char *name)
{
	if (!strcmp(name, "list")) {
		for (size_t i = 0; i < NCASES; i++)
			out("%s expect=%s", CASES[i].name, CASES[i].expect);
		return 0;
	}
	const struct hcase *c = NULL;
	for (size_t i = 0; i < NCASES; i++)
		if (!strcmp(CASES[i].name, name))
			c = &CASES[i];
	if (!c)
		die(EXIT_USAGE, "unknown hostile case %s (vnetraw hostile list)", name);
	/* Only rx queue buffers are posted for readonly-rx; the other cases leave RX empty so
	 * the device's reaction is to our TX submission alone. */
	uint16_t rx_before = 0;
	if (c->setup == S_NONE) {
		D.inited = 1;
		status_wr(0);
		if (wait_status_zero(5.0))
			die(EXIT_SETUP, "status stuck at %#x after reset", status_rd());
		D.next_page = 0;
		memset(D.mem, 0, (size_t)NPAGES * PAGE);
		/* rings for the read-back below: set up but never given to the device */
		setup_queue(&D.q[0], 0);
		setup_queue(&D.q[1], 1);
		status_wr(0);
		wait_status_zero(5.0);
		D.next_page = 0;
	} else {
		uint64_t want = (1ull << F_VERSION_1) | (1ull << F_MAC);
		if (c->setup == S_LIVE_INDIRECT)
			want |= 1ull << F_INDIRECT;
		init_to_features_ok(want);
		if (c->setup == S_LIVE_INDIRECT && !(D.features >> F_INDIRECT & 1))
			die(EXIT_NA, "not applicable: the device does not offer INDIRECT_DESC");
		enable_queue(&D.q[0]);
		enable_queue(&D.q[1]);
		driver_ok();
		rx_before = used_idx(&D.q[0]);
	}
	c->fn();
	/* Give the device time to look (it processes kicks in its event loop). */
	double until = now() + 1.0;
	uint8_t st = status_rd();
	while (!(st & ST_NEEDS_RESET) && now() < until) {
		usleep(2000);
		st = status_rd();
	}
	if (!(st & ST_NEEDS_RESET))
		usleep(200000); /* no reset yet: let it finish any completion it makes */
	st = status_rd();
	uint16_t tx_used = used_idx(&D.q[1]), rx_used = used_idx(&D.q[0]);
	uint32_t id = 0, len = 0;
	if (tx_used != 0)
		used_elem(&D.q[1], 0, &id, &len);
	uint8_t isr = r8(D.isr);
	out("mode=hostile case=%s expect=%s status=%#x needs_reset=%d isr=%#x tx_used_idx=%u"
	    " tx_used0_id=%u tx_used0_len=%u rx_used_delta=%u %s",
	    c->name, c->expect, st, !!(st & ST_NEEDS_RESET), isr, tx_used, id, len,
	    (uint16_t)(rx_used - rx_before), obs);
	/* The reset the spec asks the driver for; then the device must be usable again. */
	status_wr(0);
	if (wait_status_zero(5.0))
		die(EXIT_SETUP, "status %#x: reset after the hostile case did not complete",
		    status_rd());
	return 0;
}

/* ---- main ----------------------------------------------------------------------------------- */

static int parse_ip(const char *s, uint32_t *ip)
{
	unsigned a, b, c, d;
	char extra;
	if (sscanf(s, "%u.%u.%u.%u%c", &a, &b, &c, &d, &extra) != 4 || a > 255 || b > 255 ||
	    c > 255 || d > 255)
		return -1;
	*ip = a << 24 | b << 16 | c << 8 | d;
	return 0;
}

static void usage(void)
{
	die(EXIT_USAGE, "usage: vnetraw udp-echo|arp|status|reset|hostile CASE [--count N] "
			"[--first I] [--seed S] [--bdf BDF] [--timeout SEC] [--host IP] [--addr IP] [--port P] "
			"[--queue-size N] [--rto-ms MS] [--max-retries K] [--vfio]");
}

#include "vnetfuzz.h"

int main(int argc, char **argv)
{
	O.timeout = 30;
	O.qsize = 16;
	O.rto_ms = 200;
	O.max_retries = 20;
	O.count = 100;
	O.seed = 1;
	O.port = 5003;
	parse_ip("198.18.0.1", &O.host_ip);
	parse_ip("198.18.0.2", &O.addr_ip);
	if (argc < 2)
		usage();
	const char *cmd = argv[1];
	if (!strcmp(cmd, "fuzz"))
		return cmd_fuzz(argc, argv);
	const char *arg = NULL;
	int i = 2;
	if (!strcmp(cmd, "hostile")) {
		if (argc < 3)
			usage();
		arg = argv[2];
		i = 3;
	}
	for (; i < argc; i += 2) {
		const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		char *end = NULL;
		if (!strcmp(k, "--vfio")) { /* the one flag without a value */
			O.vfio = 1;
			i--;
			continue;
		}
		if (!v)
			usage();
		if (!strcmp(k, "--count"))
			O.count = strtoull(v, &end, 0);
		else if (!strcmp(k, "--first"))
			O.first = strtoull(v, &end, 0);
		else if (!strcmp(k, "--seed"))
			O.seed = strtoull(v, &end, 0);
		else if (!strcmp(k, "--timeout"))
			O.timeout = strtod(v, &end);
		else if (!strcmp(k, "--port"))
			O.port = (unsigned)strtoul(v, &end, 0);
		else if (!strcmp(k, "--queue-size"))
			O.qsize = (unsigned)strtoul(v, &end, 0);
		else if (!strcmp(k, "--rto-ms"))
			O.rto_ms = (unsigned)strtoul(v, &end, 0);
		else if (!strcmp(k, "--max-retries"))
			O.max_retries = (unsigned)strtoul(v, &end, 0);
		else if (!strcmp(k, "--bdf")) {
			O.bdf = v;
			end = (char *)v + strlen(v);
		} else if (!strcmp(k, "--host") || !strcmp(k, "--addr")) {
			if (parse_ip(v, !strcmp(k, "--host") ? &O.host_ip : &O.addr_ip))
				usage();
			end = (char *)v + strlen(v);
		} else
			usage();
		if (!end || *end)
			usage();
	}
	if (O.qsize == 0 || O.qsize > MAXQ || (O.qsize & (O.qsize - 1)) || O.port == 0 ||
	    O.port > 65535)
		usage();
	deadline = now() + O.timeout;

	if (!strcmp(cmd, "status") || !strcmp(cmd, "reset")) {
		open_device();
		if (!strcmp(cmd, "reset")) {
			D.inited = 1;
			status_wr(0);
			if (wait_status_zero(5.0))
				die(EXIT_SETUP, "status stuck at %#x after reset", status_rd());
		}
		out("backend=%s bdf=%s status=%#x common=%#x notify=%#x mult=%u isr=%#x device=%#x bar0_len=%zu",
		    D.vfio ? "vfio" : "sysfs", D.bdf, status_rd(), D.common, D.notify, D.notify_mult, D.isr, D.device,
		    D.bar0_len);
		return 0;
	}
	if (strcmp(cmd, "udp-echo") && strcmp(cmd, "arp") && strcmp(cmd, "hostile"))
		usage();
	if (!strcmp(cmd, "hostile") && !strcmp(arg, "list"))
		return cmd_hostile(arg);
	open_device();
	alloc_dma();
	if (!strcmp(cmd, "udp-echo"))
		return cmd_udp_echo();
	if (!strcmp(cmd, "arp"))
		return cmd_arp();
	return cmd_hostile(arg);
}
