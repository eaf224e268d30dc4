/* hnetperf.h: hnet's performance workloads (udp-tx, udp-rx, tcp-rr), against the perf ports of
 * harness.net.peer (UdpPerf, the TCP echo). Included once, by hnet.c, after its helpers (now,
 * fail, metrics, make_addr, tcp_connect, struct opts, buf_a/buf_b, BLOCK).
 */
#ifndef HNETPERF_H
#define HNETPERF_H

/* ---- performance workloads (against harness.net.peer's perf ports) ------------------------ *
 * UDP datagrams start with a kind byte and an 8-byte tag naming the run, so a late datagram of
 * an earlier run is never counted: 'D' data, 'Q' query (host answers 'R' + tag + received
 * count + first/last arrival in ns), 'S' start a host->guest flood (+ size, seconds, rate),
 * 'E' end of that flood (+ how many the host sent). Integers are little-endian u64. */

static void put64(uint8_t *p, uint64_t v)
{
	for (int i = 0; i < 8; i++)
		p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get64(const uint8_t *p)
{
	uint64_t v = 0;
	for (int i = 7; i >= 0; i--)
		v = v << 8 | p[i];
	return v;
}

static int udp_socket(const struct opts *o)
{
	struct sockaddr_in sa;
	if (make_addr(o, &sa) < 0)
		return -1;
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0)
		return -1;
	int big = 4 << 20;
	setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
	if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
		close(fd);
		return -1;
	}
	return fd;
}

static uint64_t run_tag(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return ((uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec) ^ ((uint64_t)getpid() << 48);
}

/* Wait up to `secs` for a datagram of `kind` with our tag; its length, or -1. */
static ssize_t udp_wait(int fd, uint8_t kind, uint64_t tag, uint8_t *rx, double secs)
{
	double end = now() + secs;
	for (;;) {
		double left = end - now();
		if (left <= 0)
			return -1;
		struct pollfd p = {.fd = fd, .events = POLLIN};
		if (poll(&p, 1, (int)(left * 1000) + 1) <= 0)
			continue;
		ssize_t n = recv(fd, rx, 2048, 0);
		if (n >= 9 && rx[0] == kind && get64(rx + 1) == tag)
			return n;
	}
}

static int cmd_udp_tx(const struct opts *o)
{
	if (o->size < 17 || o->size > 1472)
		return fail("udp-tx: --size must be 17..1472");
	int fd = udp_socket(o);
	if (fd < 0) {
		metrics("sent=0 received=0 pps=0 seconds=0");
		return fail("udp socket: %s", strerror(errno));
	}
	uint64_t tag = run_tag(), sent = 0, errors = 0;
	uint8_t *tx = buf_a, *rx = buf_b;
	memset(tx, 0, o->size);
	tx[0] = 'D';
	put64(tx + 1, tag);
	double t0 = now(), end = t0 + o->seconds, t;
	/* Checking the clock costs a syscall-free vDSO call, but only every 64 sends anyway. */
	do {
		for (int k = 0; k < 64; k++) {
			put64(tx + 9, sent);
			if (send(fd, tx, o->size, 0) < 0) {
				errors++; /* ENOBUFS: the queue is full, the device is the bottleneck */
				continue;
			}
			sent++;
		}
		t = now();
	} while (t < end);
	double secs = t - t0;
	usleep(300000); /* let the device drain its queue before asking */
	uint8_t q[9] = {'Q'};
	put64(q + 1, tag);
	ssize_t n = -1;
	for (int tries = 0; tries < 10 && n < 0; tries++) {
		if (send(fd, q, sizeof(q), 0) < 0 && errno != ECONNREFUSED)
			break;
		n = udp_wait(fd, 'R', tag, rx, 0.5);
	}
	close(fd);
	if (n < 33) {
		metrics("sent=%llu received=0 pps=0 seconds=%.3f", (unsigned long long)sent, secs);
		return fail("udp-tx: no answer from the perf peer");
	}
	uint64_t got = get64(rx + 9), first = get64(rx + 17), last = get64(rx + 25);
	double span = (double)(last - first) / 1e9;
	/* The receiving side's rate: what the device really delivered, not what the guest queued. */
	double pps = span > 0 && got > 1 ? (double)(got - 1) / span : 0.0;
	metrics("sent=%llu received=%llu send_errors=%llu pps=%.0f tx_pps=%.0f seconds=%.3f",
		(unsigned long long)sent, (unsigned long long)got, (unsigned long long)errors, pps,
		secs > 0 ? (double)sent / secs : 0.0, secs);
	return got ? 0 : fail("udp-tx: the host received nothing");
}

static int cmd_udp_rx(const struct opts *o)
{
	if (o->size < 17 || o->size > 1472)
		return fail("udp-rx: --size must be 17..1472");
	int fd = udp_socket(o);
	if (fd < 0) {
		metrics("received=0 pps=0 seconds=0");
		return fail("udp socket: %s", strerror(errno));
	}
	uint64_t tag = run_tag(), got = 0, host_sent = 0;
	uint8_t start[33] = {'S'}, *rx = buf_b;
	put64(start + 1, tag);
	put64(start + 9, o->size);
	put64(start + 17, (uint64_t)(o->seconds * 1000));
	put64(start + 25, o->rate);
	double first = 0, last = 0, t0 = now(), resend = t0, end = t0 + o->seconds + 10;
	int ended = 0;
	if (send(fd, start, sizeof(start), 0) < 0)
		return fail("udp-rx: send: %s", strerror(errno));
	while (!ended && now() < end) {
		struct pollfd p = {.fd = fd, .events = POLLIN};
		if (poll(&p, 1, 200) <= 0) {
			/* Start request lost (or the peer not listening yet): ask again. */
			if (!got && now() - resend > 0.5) {
				resend = now();
				if (send(fd, start, sizeof(start), 0) < 0 && errno != ECONNREFUSED)
					break;
			}
			continue;
		}
		ssize_t n = recv(fd, rx, 2048, MSG_DONTWAIT);
		if (n < 9 || get64(rx + 1) != tag)
			continue;
		if (rx[0] == 'D' && (uint64_t)n == o->size) {
			last = now();
			if (!got++)
				first = last;
		} else if (rx[0] == 'E' && n >= 17) {
			host_sent = get64(rx + 9);
			ended = 1;
		}
	}
	close(fd);
	double span = last - first;
	double pps = span > 0 && got > 1 ? (double)(got - 1) / span : 0.0;
	metrics("received=%llu host_sent=%llu pps=%.0f offered_pps=%llu seconds=%.3f",
		(unsigned long long)got, (unsigned long long)host_sent, pps,
		(unsigned long long)o->rate, span);
	if (!got)
		return fail("udp-rx: nothing received");
	return ended ? 0 : fail("udp-rx: no end marker from the perf peer");
}

static int cmd_tcp_rr(const struct opts *o)
{
	if (o->size < 1 || o->size > BLOCK)
		return fail("tcp-rr: bad --size");
	int attempts;
	int fd = tcp_connect(o, &attempts);
	if (fd < 0) {
		metrics("transactions=0 tps=0 seconds=0");
		return fail("connect %s:%u: %s", o->host, o->port, strerror(errno));
	}
	int one = 1;
	setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
	memset(buf_a, 'r', o->size);
	uint64_t count = 0;
	const char *err = NULL;
	double t0 = now(), end = t0 + o->seconds, t = t0;
	while (t < end && !err) {
		if (send(fd, buf_a, o->size, MSG_NOSIGNAL) != (ssize_t)o->size) {
			err = "send";
			break;
		}
		size_t got = 0;
		while (got < o->size) {
			ssize_t n = recv(fd, buf_b + got, o->size - got, 0);
			if (n <= 0) {
				if (n < 0 && errno == EINTR)
					continue;
				err = n == 0 ? "peer closed" : "recv";
				break;
			}
			got += (size_t)n;
		}
		if (!err && memcmp(buf_a, buf_b, o->size) != 0)
			err = "response differs from the request";
		count++;
		t = now();
	}
	double secs = t - t0;
	close(fd);
	metrics("transactions=%llu tps=%.1f latency_us=%.1f seconds=%.3f", (unsigned long long)count,
		secs > 0 ? (double)count / secs : 0.0, count ? secs * 1e6 / (double)count : 0.0,
		secs);
	if (err)
		return fail("tcp-rr after %llu transactions: %s (%s)", (unsigned long long)count, err,
			    strerror(errno));
	return 0;
}

#endif
