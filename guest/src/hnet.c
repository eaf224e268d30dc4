/* hnet: the in-guest network test client (TCP send/receive, UDP echo) over the shared test stream.
 *
 * Usage: hnet <command> [--option value]...
 *   tcp-send     --host A --port P --bytes N --seed S   send N stream bytes, expect "OK" verdict
 *   tcp-recv     --host A --port P --bytes N --seed S   receive and verify N stream bytes
 *   udp-echo     --host A --port P --count C --seed S   stop-and-wait echo of the UDP schedule
 *   stream       --seed S --offset O --bytes N         raw stream bytes to stdout (for tests)
 *   udp-schedule --seed S --count C                    u16le size + payload records to stdout
 *   udp-tx       --port P --size S --seconds T         UDP packets per second guest->host: send
 *                                                      S-byte datagrams for T s, ask the host's
 *                                                      perf peer how many it received
 *   udp-rx       --port P --size S --seconds T --rate R  host->guest: ask the perf peer to send
 *                                                      S-byte datagrams at R/s for T s, count
 *   tcp-rr       --port P --size S --seconds T         request/response transactions per
 *                                                      second over one TCP connection (TCP_RR)
 * Common: --timeout SEC (whole command, default 120), --connect-timeout SEC (default 60),
 *         --rto-ms MS and --max-retries K (udp-echo), --no-verdict (tcp-send: accept plain EOF).
 *
 * Output contract (guest/init relies on it): exactly one stdout line of key=value metrics for
 * the network commands, even on failure; on failure one stderr line with the reason, exit 1.
 * Exit 2 means bad usage.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "stream.h"

#define BLOCK (256u * 1024u) /* multiple of 8 so block boundaries stay word aligned */

struct opts {
	const char *host;
	unsigned port;
	uint64_t bytes;
	uint64_t seed;
	uint64_t offset;
	uint64_t count;
	double timeout;
	double connect_timeout;
	unsigned rto_ms;
	unsigned max_retries;
	int no_verdict;
	uint64_t size;
	double seconds;
	uint64_t rate;
};

static uint8_t buf_a[BLOCK];
static uint8_t buf_b[BLOCK];

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* One whole line to stderr in one write, so it cannot be split by other console output. */
static int fail(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n > sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	if (write(2, line, (size_t)n) < 0)
		return 1;
	return 1;
}

static void metrics(const char *fmt, ...)
{
	char line[512];
	va_list ap;
	va_start(ap, fmt);
	int n = vsnprintf(line, sizeof(line) - 1, fmt, ap);
	va_end(ap);
	if (n < 0)
		n = 0;
	if ((size_t)n > sizeof(line) - 2)
		n = (int)sizeof(line) - 2;
	line[n++] = '\n';
	if (write(1, line, (size_t)n) < 0)
		return;
}

static double mbps(uint64_t bytes, double seconds)
{
	return seconds > 0 ? (double)bytes * 8.0 / seconds / 1e6 : 0.0;
}

static void set_timeouts(int fd, double seconds)
{
	struct timeval tv = {.tv_sec = (time_t)seconds,
			     .tv_usec = (suseconds_t)((seconds - (double)(time_t)seconds) * 1e6)};
	setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
	setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

static int make_addr(const struct opts *o, struct sockaddr_in *sa)
{
	memset(sa, 0, sizeof(*sa));
	sa->sin_family = AF_INET;
	sa->sin_port = htons((uint16_t)o->port);
	if (inet_pton(AF_INET, o->host, &sa->sin_addr) != 1)
		return -1;
	return 0;
}

/* The host peer may start after the guest is ready, so refused/unreachable is retried until
 * --connect-timeout; SO_SNDTIMEO bounds each attempt (Linux applies it to connect). */
static int tcp_connect(const struct opts *o, int *attempts)
{
	struct sockaddr_in sa;
	double deadline = now() + o->connect_timeout;
	int last = 0;

	if (make_addr(o, &sa) < 0) {
		errno = EINVAL;
		return -1;
	}
	*attempts = 0;
	while (now() < deadline) {
		int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
		if (fd < 0)
			return -1;
		set_timeouts(fd, 2.0);
		(*attempts)++;
		if (connect(fd, (struct sockaddr *)&sa, sizeof(sa)) == 0) {
			set_timeouts(fd, 30.0); /* a 30 s stall is a failure, not slowness */
			return fd;
		}
		last = errno;
		close(fd);
		usleep(200000);
	}
	errno = last ? last : ETIMEDOUT;
	return -1;
}

static int cmd_tcp_send(const struct opts *o)
{
	int attempts;
	int fd = tcp_connect(o, &attempts);
	if (fd < 0) {
		metrics("bytes=0 seconds=0 mbps=0 connect_attempts=%d", attempts);
		return fail("connect %s:%u: %s", o->host, o->port, strerror(errno));
	}
	double t0 = now(), deadline = t0 + o->timeout;
	uint64_t sent = 0;
	const char *err = NULL;
	int saved = 0;

	while (sent < o->bytes && !err) {
		size_t chunk = o->bytes - sent < BLOCK ? (size_t)(o->bytes - sent) : BLOCK;
		stream_fill(o->seed, sent, buf_a, chunk);
		size_t done = 0;
		while (done < chunk) {
			ssize_t n = send(fd, buf_a + done, chunk - done, MSG_NOSIGNAL);
			if (n < 0) {
				if (errno == EINTR)
					continue;
				saved = errno;
				err = "send";
				break;
			}
			done += (size_t)n;
		}
		sent += done;
		if (now() > deadline && sent < o->bytes) {
			saved = ETIMEDOUT;
			err = "send";
		}
	}

	/* The sink answers "OK <bytes>" or "BAD <offset> ..." after our EOF: this waits for the
	 * host's byte-exact verdict, so "ok" in KTAP means the host really checked everything. */
	char verdict[128] = "";
	size_t vlen = 0;
	if (!err) {
		shutdown(fd, SHUT_WR);
		for (;;) {
			ssize_t n = recv(fd, verdict + vlen, sizeof(verdict) - 1 - vlen, 0);
			if (n < 0 && errno == EINTR)
				continue;
			if (n < 0) {
				saved = errno;
				err = "waiting for verdict";
				break;
			}
			if (n == 0 || vlen + (size_t)n >= sizeof(verdict) - 1) {
				vlen += (size_t)(n > 0 ? n : 0);
				break;
			}
			vlen += (size_t)n;
		}
		verdict[vlen] = '\0';
		verdict[strcspn(verdict, "\r\n")] = '\0';
	}
	double secs = now() - t0;
	close(fd);
	metrics("bytes=%llu seconds=%.3f mbps=%.1f connect_attempts=%d", (unsigned long long)sent,
		secs, mbps(sent, secs), attempts);
	if (err)
		return fail("%s after %llu bytes: %s", err, (unsigned long long)sent,
			    strerror(saved));
	if (o->no_verdict)
		return 0;
	if (strncmp(verdict, "OK", 2) == 0)
		return 0;
	if (vlen == 0)
		return fail("peer closed without a verdict");
	return fail("peer verdict: %s", verdict);
}

static int cmd_tcp_recv(const struct opts *o)
{
	int attempts;
	int fd = tcp_connect(o, &attempts);
	if (fd < 0) {
		metrics("bytes=0 seconds=0 mbps=0 connect_attempts=%d", attempts);
		return fail("connect %s:%u: %s", o->host, o->port, strerror(errno));
	}
	double t0 = now(), deadline = t0 + o->timeout;
	uint64_t got = 0;
	int rc = 0;

	for (;;) {
		ssize_t n = recv(fd, buf_a, BLOCK, 0);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0) {
			rc = fail("recv after %llu bytes: %s", (unsigned long long)got, strerror(errno));
			break;
		}
		if (n == 0)
			break;
		size_t len = (size_t)n;
		if (got + len > o->bytes) {
			rc = fail("peer sent more than %llu bytes", (unsigned long long)o->bytes);
			got += len;
			break;
		}
		stream_fill(o->seed, got, buf_b, len);
		if (memcmp(buf_a, buf_b, len) != 0) {
			size_t i = 0;
			while (buf_a[i] == buf_b[i])
				i++;
			rc = fail("mismatch at offset %llu: got 0x%02x expected 0x%02x",
				  (unsigned long long)(got + i), buf_a[i], buf_b[i]);
			got += i;
			break;
		}
		got += len;
		if (now() > deadline) {
			rc = fail("timeout after %llu bytes", (unsigned long long)got);
			break;
		}
	}
	double secs = now() - t0;
	close(fd);
	metrics("bytes=%llu seconds=%.3f mbps=%.1f connect_attempts=%d", (unsigned long long)got,
		secs, mbps(got, secs), attempts);
	if (rc)
		return rc;
	if (got != o->bytes)
		return fail("short stream: %llu of %llu bytes", (unsigned long long)got,
			    (unsigned long long)o->bytes);
	return 0;
}

static int cmd_udp_echo(const struct opts *o)
{
	struct sockaddr_in sa;
	if (make_addr(o, &sa) < 0)
		return fail("bad host %s", o->host);
	int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	if (fd < 0 || connect(fd, (struct sockaddr *)&sa, sizeof(sa)) < 0)
		return fail("udp socket: %s", strerror(errno));

	double t0 = now(), deadline = t0 + o->timeout;
	uint64_t bytes = 0, retransmits = 0, stale = 0, refused = 0, i;
	size_t size = 0, prev_size = 0;
	int rc = 0;
	uint8_t *cur = buf_a, *prev = buf_b, *rx = buf_a + 2048;

	for (i = 0; i < o->count && !rc; i++) {
		uint8_t *t = prev;
		prev = cur;
		cur = t;
		prev_size = size;
		size = udp_payload(o->seed, i, cur);
		unsigned tries = 0;
		int echoed = 0;
		while (!echoed && !rc) {
			if (tries > o->max_retries) {
				rc = fail("datagram %llu: no echo after %u sends",
					  (unsigned long long)i, tries);
				break;
			}
			if (now() > deadline) {
				rc = fail("timeout at datagram %llu", (unsigned long long)i);
				break;
			}
			if (tries++)
				retransmits++;
			if (send(fd, cur, size, 0) < 0 && errno != ECONNREFUSED) {
				rc = fail("send datagram %llu: %s", (unsigned long long)i,
					  strerror(errno));
				break;
			}
			/* Wait out one RTO, discarding late echoes of the previous datagram. */
			double rto_end = now() + o->rto_ms / 1000.0;
			for (;;) {
				double left = rto_end - now();
				if (left <= 0)
					break;
				struct pollfd p = {.fd = fd, .events = POLLIN};
				int pr = poll(&p, 1, (int)(left * 1000) + 1);
				if (pr <= 0)
					break;
				ssize_t n = recv(fd, rx, 2048, 0);
				if (n < 0) {
					if (errno == ECONNREFUSED) { /* peer not listening yet */
						refused++;
						usleep(o->rto_ms * 1000);
						break;
					}
					if (errno == EINTR || errno == EAGAIN)
						continue;
					rc = fail("recv datagram %llu: %s", (unsigned long long)i,
						  strerror(errno));
					break;
				}
				if ((size_t)n == size && memcmp(rx, cur, size) == 0) {
					echoed = 1;
					break;
				}
				if (i > 0 && (size_t)n == prev_size &&
				    memcmp(rx, prev, prev_size) == 0) {
					stale++;
					continue;
				}
				size_t k = 0;
				while (k < (size_t)n && k < size && rx[k] == cur[k])
					k++;
				rc = fail("datagram %llu: bad echo (%zd bytes, expected %zu, first "
					  "difference at %zu)",
					  (unsigned long long)i, n, size, k);
				break;
			}
		}
		if (echoed)
			bytes += size;
	}
	double secs = now() - t0;
	close(fd);
	uint64_t good = rc ? i - 1 : i;
	metrics("datagrams=%llu bytes=%llu retransmits=%llu stale=%llu refused=%llu seconds=%.3f",
		(unsigned long long)good, (unsigned long long)bytes,
		(unsigned long long)retransmits, (unsigned long long)stale,
		(unsigned long long)refused, secs);
	return rc;
}

#include "hnetperf.h"

static int write_all(int fd, const uint8_t *p, size_t len)
{
	while (len) {
		ssize_t n = write(fd, p, len);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return -1;
		}
		p += n;
		len -= (size_t)n;
	}
	return 0;
}

static int cmd_stream(const struct opts *o)
{
	uint64_t done = 0;
	while (done < o->bytes) {
		size_t chunk = o->bytes - done < BLOCK ? (size_t)(o->bytes - done) : BLOCK;
		stream_fill(o->seed, o->offset + done, buf_a, chunk);
		if (write_all(1, buf_a, chunk) < 0)
			return fail("write: %s", strerror(errno));
		done += chunk;
	}
	return 0;
}

static int cmd_udp_schedule(const struct opts *o)
{
	for (uint64_t i = 0; i < o->count; i++) {
		size_t size = udp_payload(o->seed, i, buf_a + 2);
		buf_a[0] = (uint8_t)(size & 0xff);
		buf_a[1] = (uint8_t)(size >> 8);
		if (write_all(1, buf_a, size + 2) < 0)
			return fail("write: %s", strerror(errno));
	}
	return 0;
}

static int usage(const char *msg)
{
	fail("hnet: %s (commands: tcp-send tcp-recv udp-echo stream udp-schedule udp-tx udp-rx "
	     "tcp-rr)",
	     msg);
	return 2;
}

int main(int argc, char **argv)
{
	struct opts o = {.host = "198.18.0.1",
			 .bytes = 64ull << 20,
			 .count = 1000,
			 .timeout = 120,
			 .connect_timeout = 60,
			 .rto_ms = 200,
			 .max_retries = 100,
			 .size = 64,
			 .seconds = 3,
			 .rate = 50000};

	if (argc < 2)
		return usage("missing command");
	for (int a = 2; a < argc; a++) {
		const char *k = argv[a];
		if (strcmp(k, "--no-verdict") == 0) {
			o.no_verdict = 1;
			continue;
		}
		if (a + 1 >= argc)
			return usage("option without value");
		const char *v = argv[++a];
		char *end;
		errno = 0;
		unsigned long long n = strtoull(v, &end, 0);
		int numeric = errno == 0 && *end == '\0' && end != v;
		if (strcmp(k, "--host") == 0)
			o.host = v;
		else if (strcmp(k, "--timeout") == 0)
			o.timeout = atof(v);
		else if (strcmp(k, "--connect-timeout") == 0)
			o.connect_timeout = atof(v);
		else if (strcmp(k, "--seconds") == 0)
			o.seconds = atof(v);
		else if (!numeric)
			return usage("bad option or value");
		else if (strcmp(k, "--port") == 0)
			o.port = (unsigned)n;
		else if (strcmp(k, "--bytes") == 0)
			o.bytes = n;
		else if (strcmp(k, "--seed") == 0)
			o.seed = n;
		else if (strcmp(k, "--offset") == 0)
			o.offset = n;
		else if (strcmp(k, "--count") == 0)
			o.count = n;
		else if (strcmp(k, "--rto-ms") == 0)
			o.rto_ms = (unsigned)n;
		else if (strcmp(k, "--max-retries") == 0)
			o.max_retries = (unsigned)n;
		else if (strcmp(k, "--size") == 0)
			o.size = n;
		else if (strcmp(k, "--rate") == 0)
			o.rate = n;
		else
			return usage("unknown option");
	}

	const char *cmd = argv[1];
	if (strcmp(cmd, "tcp-send") == 0)
		return cmd_tcp_send(&o);
	if (strcmp(cmd, "tcp-recv") == 0)
		return cmd_tcp_recv(&o);
	if (strcmp(cmd, "udp-echo") == 0)
		return cmd_udp_echo(&o);
	if (strcmp(cmd, "stream") == 0)
		return cmd_stream(&o);
	if (strcmp(cmd, "udp-schedule") == 0)
		return cmd_udp_schedule(&o);
	if (strcmp(cmd, "udp-tx") == 0)
		return cmd_udp_tx(&o);
	if (strcmp(cmd, "udp-rx") == 0)
		return cmd_udp_rx(&o);
	if (strcmp(cmd, "tcp-rr") == 0)
		return cmd_tcp_rr(&o);
	return usage("unknown command");
}
