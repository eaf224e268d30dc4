/* vnetfuzz.h: the raw driver's seeded fuzz mode (`vnetraw fuzz`), included once by vnetraw.c.
 *
 *   vnetraw fuzz --seed S --iterations N [--first I] [--progress P] [--timeout SEC]
 *
 * Iteration I of seed S draws every choice from its own splitmix64 stream seeded with
 * (S, I), never from what the device answers, so `--first I --iterations 1` repeats it alone.
 * Each iteration: device reset; every page the device may read refilled from the stream;
 * initialisation up to a random point (ACK .. DRIVER_OK with RX buffers posted, random
 * features, queue sizes and ring placement); 1-24 random actions (descriptor chains with
 * addresses inside and outside RAM, zero/huge/overflowing lengths, NEXT/WRITE/INDIRECT and
 * unknown flags, next loops, avail.idx jumps, random heads, TX frames with random virtio-net
 * headers, ARP requests whose replies land in the RX buffers posted, RX buffers, kicks of any queue, common-config writes of every field, status and
 * feature values, MSI-X vectors, stray BAR0 reads and writes, resets mid-way); then the
 * device must still answer sanely (status read; num_queues and the offered features read as
 * at the start) and a reset must complete.
 *
 * Memory rules (the guest must survive the device it fuzzes):
 * - every in-RAM address handed to the device lies inside our own locked DMA pages, the whole
 *   length included; huge or overflowing lengths go only with addresses above guest RAM
 *   (found in /proc/iomem) or near 2^64;
 * - "descriptor pages" hold only such safe descriptors at every 16-byte slot, and the device
 *   never writes there: descriptor tables and in-RAM INDIRECT tables (16-aligned) live there;
 *   avail and used rings live in "ring pages"; buffers (device-writable ones too) in
 *   "buffer pages";
 * - queue sizes written are at most FZ_QMAX, and the rings are placed with room for that;
 * - before each queue_enable=1 the selected queue's size and ring addresses are read back
 *   and the enable is skipped (counted: unsafe_enables) unless they obey these rules: a
 *   reset device's addresses (0) or a size the device should have refused never reach DMA;
 * - the device is reset before exit, always (die() does too).
 *
 * Output: progress lines on stderr every P iterations (default 1000); one stdout line of
 * key=value at the end (mode=fuzz seed first iterations resets needs_reset insane
 * unsafe_enables actions digest failed_iteration elapsed_s rate); `digest` is the XOR of a
 * hash of each iteration's choices: a batch's digest is the XOR of its iterations' own. Exit 1 (with failed_iteration=I) when the status
 * reads insane or the device does not come out of reset: the iteration to reproduce.
 */

#define FZ_DESC_PAGES 4u /* pages 0..3 of D.mem: safe descriptor slots only */
#define FZ_RING_PAGES 4u /* 4..7: avail and used rings */
#define FZ_BUF_PAGES 16u /* 8..23: buffers */
#define FZ_PAGE0_RING FZ_DESC_PAGES
#define FZ_PAGE0_BUF (FZ_DESC_PAGES + FZ_RING_PAGES)
#define FZ_MAXQ 8u  /* queues the fuzzer places rings for */
#define FZ_QMAX 32u /* the largest queue size the fuzzer writes */
#define FZ_DESC_BYTES (16u * FZ_QMAX)
#define FZ_AVAIL_BYTES (6u + 2u * FZ_QMAX)
#define FZ_USED_BYTES (6u + 8u * FZ_QMAX)

struct fzq {
	uint64_t desc, avail, used; /* what we last wrote (the device may have refused it) */
	unsigned size;              /* the last valid size we wrote (FZ_QMAX before any) */
	uint16_t avail_idx;
	uint16_t noff; /* queue_notify_off, read once */
};

static struct {
	uint64_t s;      /* splitmix64 state of the current iteration */
	uint64_t ram_end; /* above every "System RAM" range of /proc/iomem */
	unsigned numq, maxsize[FZ_MAXQ];
	uint64_t offered;
	struct fzq q[FZ_MAXQ];
	uint16_t sel; /* queue_select as we last wrote it */
	uint8_t status;
	uint64_t resets, needs_reset, insane, unsafe_enables, actions, iter;
	uint64_t digest; /* XOR of each iteration's hash of its choices (see fz_iteration) */
} FZ;

static void fz_err(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	line(2, fmt, ap);
	va_end(ap);
}

static uint64_t fz_mix(uint64_t z)
{
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static uint64_t fz_rand(void)
{
	FZ.s += 0x9e3779b97f4a7c15ull;
	return fz_mix(FZ.s);
}

static uint64_t fz_below(uint64_t n) { return n ? fz_rand() % n : 0; }
static int fz_pct(unsigned p) { return fz_below(100) < p; }

static uint8_t *fz_page(unsigned i, uint64_t *pa)
{
	*pa = D.pa[i];
	return D.mem + (size_t)i * PAGE;
}

/* ---- addresses -------------------------------------------------------------------------- */

static void fz_find_ram_end(void)
{
	FILE *f = fopen("/proc/iomem", "r");
	char ln[256];
	FZ.ram_end = 1ull << 32;
	if (!f)
		return;
	while (fgets(ln, sizeof(ln), f)) {
		unsigned long long a, b;
		if (strstr(ln, "System RAM") && sscanf(ln, " %llx-%llx", &a, &b) == 2 && b == 0)
			die(EXIT_SETUP, "/proc/iomem shows no addresses (not root?)");
		if (strstr(ln, "System RAM") && sscanf(ln, " %llx-%llx", &a, &b) == 2 &&
		    b + 1 > FZ.ram_end)
			FZ.ram_end = b + 1;
	}
	fclose(f);
}

/* An address no guest RAM backs: just above RAM, far above (1 TiB+), or near 2^64. */
static uint64_t fz_out_addr(void)
{
	switch (fz_below(4)) {
	case 0:
		return FZ.ram_end + fz_below(1u << 20);
	case 1:
		return (1ull << 40) + (fz_rand() >> 25);
	case 2:
		return 0ull - 1 - fz_below(1u << 16);
	default:
		return fz_rand() | 1ull << 63;
	}
}

static uint32_t fz_any_len(void)
{
	static const uint32_t pick[] = {0, 1, 12, 16, 4096, 65536, 0x7fffffffu, 0x80000000u,
					0xfffff000u, 0xffffffffu};
	return fz_pct(60) ? pick[fz_below(sizeof(pick) / sizeof(pick[0]))] : (uint32_t)fz_rand();
}

/* A length for a buffer of at most `room` bytes (0 and exactly `room` are likely). */
static uint32_t fz_len_upto(uint32_t room)
{
	switch (fz_below(6)) {
	case 0:
		return 0;
	case 1:
		return room;
	case 2:
		return room < HDR_LEN ? room : HDR_LEN;
	case 3:
		return (uint32_t)fz_below(room < 16 ? room + 1 : 16);
	default:
		return (uint32_t)fz_below((uint64_t)room + 1);
	}
}

/* A safe in-RAM address in a buffer page; *room: bytes from there to the page's end. */
static uint64_t fz_buf_addr(uint32_t *room)
{
	uint64_t pa;
	fz_page(FZ_PAGE0_BUF + (unsigned)fz_below(FZ_BUF_PAGES), &pa);
	uint32_t off = fz_pct(30) ? 0 : (uint32_t)fz_below(PAGE);
	*room = PAGE - off;
	return pa + off;
}

/* ---- descriptors ----------------------------------------------------------------------- */

static void fz_put_desc(uint8_t *slot, uint64_t addr, uint32_t len, uint16_t flags,
			uint16_t next)
{
	memcpy(slot, &addr, 8);
	memcpy(slot + 8, &len, 4);
	memcpy(slot + 12, &flags, 2);
	memcpy(slot + 14, &next, 2);
}

/* One random descriptor that obeys the memory rules (see the top of this file). */
static void fz_desc(uint8_t *slot, unsigned qsize)
{
	uint16_t flags = 0;
	if (fz_pct(40))
		flags |= D_NEXT;
	if (fz_pct(30))
		flags |= D_WRITE;
	if (fz_pct(10))
		flags |= D_INDIRECT;
	if (fz_pct(3))
		flags |= (uint16_t)(1u << (3 + fz_below(13))); /* a flag no spec defines */
	uint64_t addr;
	uint32_t len, room;
	if (fz_pct(75)) {
		if (flags & D_INDIRECT) {
			uint64_t pa;
			fz_page((unsigned)fz_below(FZ_DESC_PAGES), &pa);
			uint32_t off = 16u * (uint32_t)fz_below(PAGE / 16);
			addr = pa + off;
			room = PAGE - off;
			len = fz_pct(60) ? 16u * (uint32_t)fz_below(room / 16 + 1) : fz_len_upto(room);
		} else {
			addr = fz_buf_addr(&room);
			len = fz_len_upto(room);
		}
	} else {
		addr = fz_out_addr();
		len = fz_any_len();
	}
	uint16_t next;
	switch (fz_below(10)) {
	case 0:
		next = (uint16_t)(qsize + fz_below(8));
		break;
	case 1:
		next = (uint16_t)fz_rand();
		break;
	default:
		next = (uint16_t)fz_below(qsize ? qsize : 1);
	}
	fz_put_desc(slot, addr, len, flags, next);
}

/* The descriptor slot `i` of queue q's table, if the table is in our memory. */
static uint8_t *fz_table_slot(unsigned q, unsigned i)
{
	uint64_t a = FZ.q[q].desc;
	for (unsigned p = 0; p < FZ_DESC_PAGES; p++)
		if (a >= D.pa[p] && a - D.pa[p] <= PAGE - FZ_DESC_BYTES)
			return D.mem + (size_t)p * PAGE + (a - D.pa[p]) + 16u * (i % FZ_QMAX);
	return NULL;
}

static volatile uint8_t *fz_ring(uint64_t a, uint32_t bytes)
{
	for (unsigned p = FZ_PAGE0_RING; p < FZ_PAGE0_RING + FZ_RING_PAGES; p++)
		if (a >= D.pa[p] && a - D.pa[p] <= PAGE - bytes) /* no a + bytes: it may wrap */
			return D.mem + (size_t)p * PAGE + (a - D.pa[p]);
	return NULL;
}

/* ---- rings and the safety check before enable ------------------------------------------ */

static void fz_place(unsigned q, int tidy)
{
	struct fzq *z = &FZ.q[q];
	uint64_t pa;
	/* Tables of well-placed queues do not share: each has its own 512-byte slice. */
	unsigned dp = tidy ? q / (PAGE / FZ_DESC_BYTES) : (unsigned)fz_below(FZ_DESC_PAGES);
	fz_page(dp, &pa);
	z->desc = pa + (tidy ? (q % (PAGE / FZ_DESC_BYTES)) * FZ_DESC_BYTES
			     : 16u * fz_below((PAGE - FZ_DESC_BYTES) / 16 + 1));
	if (!tidy && fz_pct(8))
		z->desc = fz_pct(50) ? fz_out_addr() : fz_out_addr() | (1u + fz_below(15));
	fz_page(FZ_PAGE0_RING + (tidy ? q % FZ_RING_PAGES : (unsigned)fz_below(FZ_RING_PAGES)),
		&pa);
	if (tidy) {
		z->avail = pa + (q / FZ_RING_PAGES) * 1024;
		z->used = z->avail + 512;
	} else {
		z->avail = pa + (fz_pct(80) ? 2 * fz_below((PAGE - FZ_AVAIL_BYTES) / 2)
					   : fz_below(PAGE - FZ_AVAIL_BYTES));
		fz_page(FZ_PAGE0_RING + (unsigned)fz_below(FZ_RING_PAGES), &pa);
		z->used = pa + (fz_pct(80) ? 4 * fz_below((PAGE - FZ_USED_BYTES) / 4)
					  : fz_below(PAGE - FZ_USED_BYTES));
		if (fz_pct(5))
			z->avail = fz_out_addr();
		if (fz_pct(5))
			z->used = fz_out_addr();
	}
	w64(D.common + C_QDESC, z->desc);
	w64(D.common + C_QAVAIL, z->avail);
	w64(D.common + C_QUSED, z->used);
}

static int fz_in_desc_pages(uint64_t a, uint64_t bytes)
{
	for (unsigned p = 0; p < FZ_DESC_PAGES; p++)
		if (a >= D.pa[p] && bytes <= PAGE && a - D.pa[p] <= PAGE - bytes)
			return 1;
	return 0;
}

static int fz_outside(uint64_t a) { return a >= FZ.ram_end; }

/* Read back what the device would use: enable only if every ring obeys the memory rules. */
static int fz_safe_to_enable(void)
{
	unsigned size = r16(D.common + C_QSIZE);
	uint64_t d = r32(D.common + C_QDESC) | (uint64_t)r32(D.common + C_QDESC + 4) << 32;
	uint64_t a = r32(D.common + C_QAVAIL) | (uint64_t)r32(D.common + C_QAVAIL + 4) << 32;
	uint64_t u = r32(D.common + C_QUSED) | (uint64_t)r32(D.common + C_QUSED + 4) << 32;
	if (size > FZ_QMAX)
		return 0;
	int dok = fz_outside(d) || (fz_in_desc_pages(d, 16u * size) && d % 16 == 0);
	int aok = fz_outside(a) || fz_ring(a, 6u + 2u * size);
	int uok = fz_outside(u) || fz_ring(u, 6u + 8u * size);
	return dok && aok && uok;
}

static void fz_enable(void)
{
	if (!fz_safe_to_enable()) {
		FZ.unsafe_enables++;
		return;
	}
	w16(D.common + C_QENABLE, 1);
}

static void fz_select(uint16_t q)
{
	FZ.sel = q;
	w16(D.common + C_QSEL, q);
}

static unsigned fz_pick_queue(void)
{
	unsigned n = FZ.numq < FZ_MAXQ ? FZ.numq : FZ_MAXQ;
	return fz_pct(85) ? (unsigned)fz_below(n < 2 ? 2 : n) : (unsigned)fz_below(FZ_MAXQ);
}

static uint16_t fz_pick_size(unsigned q)
{
	unsigned max = FZ.maxsize[q] < FZ_QMAX ? FZ.maxsize[q] : FZ_QMAX;
	static const uint16_t bad[] = {0, 3, 15, 24, 0x8000, 0xffff};
	if (fz_pct(85) && max) {
		unsigned s = 1;
		for (unsigned k = (unsigned)fz_below(6); k && s * 2 <= max; k--)
			s *= 2;
		return (uint16_t)s;
	}
	if (fz_pct(30) && FZ.maxsize[q])
		return (uint16_t)(FZ.maxsize[q] * 2); /* a power of two above the maximum */
	return bad[fz_below(sizeof(bad) / sizeof(bad[0]))];
}

static void fz_write_size(unsigned q, uint16_t v)
{
	w16(D.common + C_QSIZE, v);
	if (q < FZ_MAXQ && v && !(v & (v - 1)) && v <= FZ.maxsize[q])
		FZ.q[q].size = v;
}

/* ---- submissions ----------------------------------------------------------------------- */

static void fz_kick(unsigned q)
{
	uint64_t off = (uint64_t)D.notify + (uint64_t)(q < FZ_MAXQ ? FZ.q[q].noff : q) *
						   D.notify_mult;
	if (off + 4 > D.bar0_len)
		return;
	if (fz_pct(90))
		*(volatile uint16_t *)(D.bar0 + off) = (uint16_t)q;
	else
		*(volatile uint32_t *)(D.bar0 + off) = (uint32_t)fz_rand();
	mb();
}

/* A ring field store; the fuzzer's rings may be misaligned on purpose. */
static void fz_st16(volatile uint8_t *p, uint16_t v)
{
	memcpy((uint8_t *)p, &v, 2);
}

static void fz_avail_put(unsigned q, uint16_t head)
{
	struct fzq *z = &FZ.q[q];
	volatile uint8_t *av = fz_ring(z->avail, FZ_AVAIL_BYTES);
	if (!av)
		return;
	unsigned size = z->size ? z->size : 1;
	fz_st16(av + 4 + 2 * (z->avail_idx % size), head);
	mb();
	z->avail_idx++;
	fz_st16(av + 2, z->avail_idx);
	mb();
}

/* A chain of 1..4 random descriptors from a random head (loops and strays included). */
static void fz_chain(unsigned q)
{
	struct fzq *z = &FZ.q[q];
	unsigned size = z->size, head = (unsigned)fz_below(size), n = 1 + (unsigned)fz_below(4);
	for (unsigned i = 0, d = head; i < n; i++) {
		uint8_t *slot = fz_table_slot(q, d);
		if (!slot)
			break;
		fz_desc(slot, size);
		uint16_t next;
		memcpy(&next, slot + 14, 2);
		d = next % FZ_QMAX;
	}
	uint16_t h = fz_pct(90) ? (uint16_t)head : (uint16_t)(size + fz_below(0x10000 - size));
	fz_avail_put(q, h);
	if (fz_pct(70))
		fz_kick(q);
}

/* A well-formed ARP request for the host: its reply exercises the RX path into whatever
 * buffers the fuzzer posted (the wait lets it land before the reset; how long is drawn). */
static void fz_arp(unsigned q)
{
	struct fzq *z = &FZ.q[q];
	unsigned size = z->size, head = (unsigned)fz_below(size);
	useconds_t wait = (useconds_t)fz_below(4000);
	uint8_t *slot = fz_table_slot(q, head);
	if (!slot || !size)
		return;
	static const uint8_t zero[6];
	uint64_t pa;
	uint8_t *b = fz_page(FZ_PAGE0_BUF + (unsigned)fz_below(FZ_BUF_PAGES), &pa);
	memset(b, 0, HDR_LEN);
	uint32_t n = (uint32_t)arp_build(b + HDR_LEN, 1, BCAST, zero, O.host_ip);
	fz_put_desc(slot, pa, HDR_LEN + n, 0, 0);
	fz_avail_put(q, (uint16_t)head);
	fz_kick(q);
	usleep(wait);
}

/* A TX frame with a random virtio-net header: 1 to 3 descriptors into buffer pages. */
static void fz_tx(unsigned q)
{
	struct fzq *z = &FZ.q[q];
	uint64_t pa;
	unsigned pg = FZ_PAGE0_BUF + (unsigned)fz_below(FZ_BUF_PAGES);
	uint8_t *b = fz_page(pg, &pa);
	uint32_t off = fz_pct(50) ? 0 : (uint32_t)fz_below(PAGE / 2);
	uint8_t *h = b + off;
	static const uint8_t gso[] = {0, 1, 3, 4, 5, 0x80, 0x81, 0x42};
	static const uint32_t flen[] = {0, 1, 13, 14, 42, 60, 64, 1514, 1518, 1600};
	h[0] = fz_pct(70) ? 0 : (uint8_t)fz_rand();                /* flags */
	h[1] = fz_pct(70) ? 0 : gso[fz_below(sizeof(gso))];        /* gso_type */
	for (unsigned i = 2; i < 10; i++)                            /* hdr_len .. csum_offset */
		h[i] = fz_pct(60) ? 0 : (uint8_t)fz_rand();
	h[10] = h[11] = 0;                                           /* num_buffers */
	uint32_t room = PAGE - off - HDR_LEN;
	uint32_t len = fz_pct(80) ? flen[fz_below(sizeof(flen) / 4)] : (uint32_t)fz_below(room);
	if (len > room)
		len = room;
	uint8_t *f = h + HDR_LEN;
	static const uint8_t host[6] = {0xff, 0xff, 0xff, 0xff, 0xff, 0xff};
	if (len >= 14) {
		if (fz_pct(50))
			memcpy(f, host, 6);
		memcpy(f + 6, D.mac, 6);
		static const uint16_t et[] = {0x0800, 0x0806, 0x86dd, 0x8100, 0x88cc};
		put16(f + 12, fz_pct(80) ? et[fz_below(5)] : (uint16_t)fz_rand());
	}
	unsigned size = z->size, head = (unsigned)fz_below(size);
	uint8_t *s0 = fz_table_slot(q, head);
	if (!s0 || !size)
		return;
	unsigned split = (unsigned)fz_below(3); /* 0: one descriptor; 1: header apart; 2: 3 parts */
	if (!split) {
		fz_put_desc(s0, pa + off, HDR_LEN + len, 0, 0);
	} else {
		unsigned d1 = (head + 1) % size, d2 = (head + 2) % size;
		uint32_t hl = fz_pct(80) ? HDR_LEN : (uint32_t)fz_below(HDR_LEN + 1);
		fz_put_desc(s0, pa + off, hl, D_NEXT, (uint16_t)d1);
		uint32_t rest = HDR_LEN + len - hl, a = split == 2 ? rest / 2 : rest;
		uint8_t *s1 = fz_table_slot(q, d1), *s2 = fz_table_slot(q, d2);
		fz_put_desc(s1, pa + off + hl, a, split == 2 ? D_NEXT : 0, (uint16_t)d2);
		if (split == 2)
			fz_put_desc(s2, pa + off + hl + a, rest - a, 0, 0);
	}
	fz_avail_put(q, (uint16_t)head);
	fz_kick(q);
}

/* Well-formed device-writable buffers (what RX wants), then a kick. */
static void fz_post_rx(unsigned q, unsigned n)
{
	for (unsigned i = 0; i < n; i++) {
		unsigned d = (unsigned)fz_below(FZ.q[q].size);
		uint8_t *slot = fz_table_slot(q, d);
		uint64_t pa;
		if (!slot)
			return;
		fz_page(FZ_PAGE0_BUF + (unsigned)fz_below(FZ_BUF_PAGES), &pa);
		fz_put_desc(slot, pa, fz_pct(90) ? PAGE : (uint32_t)fz_below(PAGE), D_WRITE, 0);
		fz_avail_put(q, (uint16_t)d);
	}
	fz_kick(q);
}

/* ---- transport ------------------------------------------------------------------------- */

static uint64_t fz_features(void)
{
	uint64_t f = FZ.offered & fz_rand();
	if (fz_pct(90))
		f |= 1ull << F_VERSION_1;
	if (fz_pct(8))
		f |= 1ull << fz_below(64); /* maybe never offered */
	return f;
}

static void fz_status(uint8_t v)
{
	FZ.status = v;
	status_wr(v);
	if (v == 0)
		wait_status_zero(5.0);
}

static uint16_t fz_vector(void)
{
	static const uint16_t v[] = {0, 1, 2, 3, 0xffff, 0xfffe, 99};
	return v[fz_below(sizeof(v) / sizeof(v[0]))];
}

/* Reset state, then ACK .. DRIVER_OK + RX buffers: stop at a random step. */
static void fz_init_to(unsigned stage)
{
	for (unsigned q = 0; q < FZ_MAXQ; q++) { /* what a reset device has */
		FZ.q[q].size = FZ_QMAX < FZ.maxsize[q] ? FZ_QMAX : FZ.maxsize[q];
		FZ.q[q].avail_idx = 0;
		FZ.q[q].desc = FZ.q[q].avail = FZ.q[q].used = 0;
	}
	if (stage >= 1)
		fz_status(ST_ACK);
	if (stage >= 2)
		fz_status(ST_ACK | ST_DRIVER);
	if (stage >= 3)
		write_features(fz_features());
	if (stage >= 4)
		fz_status(ST_ACK | ST_DRIVER | ST_FEATURES_OK);
	unsigned n = FZ.numq < FZ_MAXQ ? FZ.numq : FZ_MAXQ;
	int tidy = fz_pct(80);
	for (unsigned q = 0; stage >= 5 && q < n; q++) {
		fz_select((uint16_t)q);
		fz_write_size(q, tidy ? (uint16_t)FZ.q[q].size : fz_pick_size(q));
		fz_place(q, tidy);
		w16(D.common + C_QMSIX, fz_pct(80) ? NO_VECTOR : fz_vector());
		if (stage >= 6 && fz_pct(90))
			fz_enable();
	}
	if (stage >= 7)
		fz_status(ST_ACK | ST_DRIVER | ST_FEATURES_OK | ST_DRIVER_OK);
	if (stage >= 8)
		fz_post_rx(0, 1 + (unsigned)fz_below(FZ.q[0].size));
}

static unsigned fz_stage(void) { return fz_pct(60) ? 8 : (unsigned)fz_below(9); }

/* One write of a common-config field (any field, interesting values; addresses and enable
 * only through the memory rules). */
static void fz_common_write(void)
{
	unsigned q = FZ.sel < FZ_MAXQ ? FZ.sel : 0;
	switch (fz_below(14)) {
	case 0:
		w32(D.common + C_DFSEL, (uint32_t)fz_below(4));
		break;
	case 1:
		w32(D.common + C_GFSEL, fz_pct(90) ? (uint32_t)fz_below(4) : (uint32_t)fz_rand());
		break;
	case 2:
		w32(D.common + C_GF, fz_pct(70) ? (uint32_t)fz_features() : (uint32_t)fz_rand());
		break;
	case 3:
		w16(D.common + C_MSIX, fz_vector());
		break;
	case 4:
		fz_status(fz_pct(60) ? (uint8_t)(1u << fz_below(8)) | FZ.status : (uint8_t)fz_rand());
		break;
	case 5:
		fz_select(fz_pct(90) ? (uint16_t)fz_pick_queue() : (uint16_t)fz_rand());
		break;
	case 6:
		fz_write_size(FZ.sel, fz_pick_size(q));
		break;
	case 7:
		w16(D.common + C_QMSIX, fz_vector());
		break;
	case 8:
		if (fz_pct(70))
			fz_enable();
		else
			w16(D.common + C_QENABLE, (uint16_t)(fz_pct(50) ? 0 : fz_rand() | 2));
		break;
	case 9:
		if (FZ.sel < FZ_MAXQ)
			fz_place(FZ.sel, 0);
		break;
	case 10: /* read-only fields */
		w16(D.common + (fz_pct(50) ? C_NUMQ : C_QNOFF), (uint16_t)fz_rand());
		break;
	case 11:
		w8(D.common + C_GEN, (uint8_t)fz_rand());
		break;
	case 12: /* beyond the defined fields: queue_notify_data, queue_reset, padding */
		w16(D.common + 56 + 2 * (uint32_t)fz_below(4), (uint16_t)fz_rand());
		break;
	default: /* a wrong width: one byte of a wider field, or a u16 where a u32 lives */
		if (fz_pct(50))
			w8(D.common + 2 * (uint32_t)fz_below(32) + 1, (uint8_t)fz_rand());
		else
			w16(D.common + (fz_pct(50) ? C_DFSEL : C_QDESC) + 2 * (uint32_t)fz_below(8),
			    (uint16_t)fz_rand());
	}
}

/* A BAR0 access outside the common config: ISR, device config, doorbells, gaps; any width. */
static void fz_stray(int write)
{
	uint32_t base[] = {D.isr, D.device, D.notify, D.isr + 0x100};
	uint32_t off = base[fz_below(4)] + (uint32_t)fz_below(64);
	unsigned w = 1u << fz_below(4);
	if (off + w > D.bar0_len || (off >= D.common && off < D.common + 64))
		return;
	volatile uint8_t *p = D.bar0 + off;
	if (!write) {
		if (w == 1)
			(void)*(volatile uint8_t *)p;
		else if (w == 2 && !(off & 1))
			(void)*(volatile uint16_t *)p;
		else if (w == 4 && !(off & 3))
			(void)*(volatile uint32_t *)p;
		else if (w == 8 && !(off & 7))
			(void)*(volatile uint64_t *)p;
		return;
	}
	uint64_t v = fz_rand();
	if (w == 1)
		*(volatile uint8_t *)p = (uint8_t)v;
	else if (w == 2 && !(off & 1))
		*(volatile uint16_t *)p = (uint16_t)v;
	else if (w == 4 && !(off & 3))
		*(volatile uint32_t *)p = (uint32_t)v;
	mb();
}

static void fz_action(void)
{
	unsigned q = fz_pick_queue();
	unsigned r = (unsigned)fz_below(100);
	FZ.actions++;
	if (q >= FZ_MAXQ)
		q = 0;
	if (r < 20) {
		fz_chain(q);
	} else if (r < 33) {
		fz_tx(fz_pct(85) ? 1 : q);
	} else if (r < 38) {
		fz_arp(fz_pct(90) ? 1 : q);
	} else if (r < 45) {
		fz_post_rx(fz_pct(85) ? 0 : q, 1 + (unsigned)fz_below(4));
	} else if (r < 52) { /* avail.idx jumps: past the queue size, backwards, anywhere */
		struct fzq *z = &FZ.q[q];
		volatile uint8_t *av = fz_ring(z->avail, FZ_AVAIL_BYTES);
		uint16_t to[] = {(uint16_t)(z->avail_idx + z->size + 1), (uint16_t)(z->avail_idx - 1),
				 (uint16_t)fz_rand(), (uint16_t)(z->avail_idx + z->size)};
		z->avail_idx = to[fz_below(4)];
		if (av)
			fz_st16(av + 2, z->avail_idx);
		fz_kick(q);
	} else if (r < 60) {
		fz_kick(fz_pct(80) ? q : (unsigned)fz_below(64));
	} else if (r < 80) {
		fz_common_write();
	} else if (r < 84) {
		fz_stray(0);
	} else if (r < 88) {
		fz_stray(1);
	} else if (r < 92) { /* avail flags, used_event, used flags: the event fields */
		struct fzq *z = &FZ.q[q];
		volatile uint8_t *av = fz_ring(z->avail, FZ_AVAIL_BYTES);
		volatile uint8_t *us = fz_ring(z->used, FZ_USED_BYTES);
		if (av && fz_pct(50))
			fz_st16(av + (fz_pct(50) ? 0 : 4 + 2 * z->size), (uint16_t)fz_rand());
		else if (us)
			fz_st16(us + (fz_pct(50) ? 0 : 4 + 8 * z->size), (uint16_t)fz_rand());
		fz_kick(q);
	} else if (r < 95) {
		usleep((useconds_t)fz_below(3000)); /* let the device get at it */
	} else if (r < 98) {
		fz_status(0); /* reset mid-way, then start again from a random step */
		fz_init_to(fz_stage());
	} else {
		write_features(fz_features());
	}
}

/* ---- one iteration, and the command ------------------------------------------------------ */

static void fz_refill(void)
{
	/* Descriptor pages: a safe descriptor in every slot (any of them may be read). */
	for (unsigned p = 0; p < FZ_DESC_PAGES; p++)
		for (unsigned i = 0; i < PAGE / 16; i++)
			fz_desc(D.mem + (size_t)p * PAGE + 16u * i, FZ_QMAX);
	memset(D.mem + (size_t)FZ_PAGE0_RING * PAGE, 0, (size_t)FZ_RING_PAGES * PAGE);
	uint64_t *w = (uint64_t *)(D.mem + (size_t)FZ_PAGE0_BUF * PAGE);
	for (size_t i = 0; i < (size_t)FZ_BUF_PAGES * PAGE / 8; i++)
		w[i] = fz_rand();
}

/* An address as page index and offset when it is one of ours: physical addresses differ
 * from run to run, the layout does not. */
static uint64_t fz_logical(uint64_t a)
{
	for (unsigned p = 0; p < FZ_PAGE0_BUF + FZ_BUF_PAGES; p++)
		if (a >= D.pa[p] && a < D.pa[p] + PAGE)
			return (uint64_t)p << 12 | (a - D.pa[p]);
	return a;
}

static int fz_fail(const char *what, uint8_t st)
{
	FZ.insane++;
	fz_err("fuzz: %s at iteration %" PRIu64 " of seed %" PRIu64 " (status %#x)", what,
		 FZ.iter, O.seed, st);
	return -1;
}

static int fz_iteration(uint64_t it)
{
	FZ.iter = it;
	FZ.s = fz_mix(O.seed ^ fz_mix(it + 0x5eed));
	fz_status(0);
	if (status_rd() != 0)
		return fz_fail("device did not come out of reset", status_rd());
	FZ.resets++;
	FZ.sel = 0;
	fz_refill();
	fz_init_to(fz_stage());
	for (unsigned n = 1 + (unsigned)fz_below(24); n; n--)
		fz_action();
	/* Still answering, and sanely: the status register reads (its value is whatever the
	 * driver wrote, plus NEEDS_RESET), fields that never change read as at the start. */
	uint8_t st = status_rd();
	if (r16(D.common + C_NUMQ) != FZ.numq)
		return fz_fail("num_queues reads wrong", st);
	w32(D.common + C_DFSEL, 1);
	if (r32(D.common + C_DF) != (uint32_t)(FZ.offered >> 32))
		return fz_fail("device_feature[1] reads wrong", st);
	if (st & ST_NEEDS_RESET)
		FZ.needs_reset++;
	/* The digest covers the generator's final state and what it believes the device holds:
	 * the same for iteration I alone as inside any batch, unless a choice depended on state
	 * left by an earlier iteration (which would break reproducing it alone). */
	uint64_t h = FZ.s ^ FZ.sel;
	for (unsigned q = 0; q < FZ_MAXQ; q++)
		h = fz_mix(h ^ fz_logical(FZ.q[q].desc) ^ fz_logical(FZ.q[q].avail) << 1 ^
			   fz_logical(FZ.q[q].used) << 2 ^ (uint64_t)FZ.q[q].avail_idx << 48 ^
			   FZ.q[q].size);
	FZ.digest ^= fz_mix(h ^ it);
	return 0;
}

static void fz_probe(void)
{
	D.inited = 1;
	fz_status(0);
	if (status_rd() != 0)
		die(EXIT_SETUP, "status stuck at %#x after reset", status_rd());
	FZ.numq = r16(D.common + C_NUMQ);
	w32(D.common + C_DFSEL, 0);
	FZ.offered = r32(D.common + C_DF);
	w32(D.common + C_DFSEL, 1);
	FZ.offered |= (uint64_t)r32(D.common + C_DF) << 32;
	for (unsigned q = 0; q < FZ_MAXQ; q++) {
		fz_select((uint16_t)q);
		FZ.maxsize[q] = q < FZ.numq ? r16(D.common + C_QSIZE) : 0;
		FZ.q[q].noff = q < FZ.numq ? r16(D.common + C_QNOFF) : (uint16_t)q;
	}
	/* The MAC our frames come from (the ARP replies go to it). */
	static const uint8_t dflt[6] = {0x52, 0x54, 0x00, 0x12, 0x34, 0x56};
	memcpy(D.mac, dflt, 6);
	if (FZ.offered >> F_MAC & 1)
		for (int i = 0; i < 6; i++)
			D.mac[i] = r8(D.device + (uint32_t)i);
	if (FZ.numq < 2 || FZ.maxsize[0] == 0 || FZ.maxsize[1] == 0)
		die(EXIT_SETUP, "device has %u queues (rx0 size %u, tx0 size %u): need rx0 and tx0",
		    FZ.numq, FZ.maxsize[0], FZ.maxsize[1]);
	fz_find_ram_end();
}

static void fz_usage(void)
{
	die(EXIT_USAGE, "usage: vnetraw fuzz --seed S --iterations N [--first I] [--progress P] "
			"[--timeout SEC] [--bdf BDF]");
}

static int cmd_fuzz(int argc, char **argv)
{
	uint64_t n = 0, progress = 1000;
	int have_n = 0;
	O.timeout = 0; /* no deadline unless asked */
	for (int i = 2; i < argc; i += 2) {
		const char *k = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
		char *end = NULL;
		if (!v || *v == '-')
			fz_usage();
		if (!strcmp(k, "--seed"))
			O.seed = strtoull(v, &end, 0);
		else if (!strcmp(k, "--iterations")) {
			n = strtoull(v, &end, 0);
			have_n = 1;
		} else if (!strcmp(k, "--first"))
			O.first = strtoull(v, &end, 0);
		else if (!strcmp(k, "--progress"))
			progress = strtoull(v, &end, 0);
		else if (!strcmp(k, "--timeout"))
			O.timeout = strtod(v, &end);
		else if (!strcmp(k, "--bdf")) {
			O.bdf = v;
			end = (char *)v + strlen(v);
		} else
			fz_usage();
		if (!end || *end)
			fz_usage();
	}
	if (!have_n || O.first + n < O.first)
		fz_usage();
	open_device();
	alloc_dma();
	fz_probe();
	double t0 = now(), end = O.timeout > 0 ? t0 + O.timeout : 0;
	uint64_t done = 0;
	int rc = 0;
	for (uint64_t it = O.first; it < O.first + n; it++) {
		if (fz_iteration(it)) {
			rc = EXIT_VERIFY;
			break;
		}
		done++;
		if (progress && done % progress == 0)
			fz_err("fuzz: seed=%" PRIu64 " iterations=%" PRIu64 " next=%" PRIu64
				 " needs_reset=%" PRIu64 " elapsed=%.1f", O.seed, done, it + 1,
				 FZ.needs_reset, now() - t0);
		if (end && now() > end)
			break; /* a time budget: the key line says how far it got */
	}
	status_wr(0);
	int stuck = wait_status_zero(5.0);
	double el = now() - t0;
	char failed[24] = "-";
	if (rc)
		snprintf(failed, sizeof(failed), "%" PRIu64, FZ.iter);
	out("mode=fuzz seed=%" PRIu64 " first=%" PRIu64 " iterations=%" PRIu64 " resets=%" PRIu64
	    " needs_reset=%" PRIu64 " insane=%" PRIu64 " unsafe_enables=%" PRIu64
	    " actions=%" PRIu64 " digest=%016" PRIx64 " failed_iteration=%s elapsed_s=%.2f"
	    " rate=%.1f",
	    O.seed, O.first, done, FZ.resets, FZ.needs_reset, FZ.insane, FZ.unsafe_enables,
	    FZ.actions, FZ.digest, failed, el, el > 0 ? (double)done / el : 0.0);
	if (stuck)
		die(EXIT_SETUP, "status %#x: the final reset did not complete", status_rd());
	return rc;
}
