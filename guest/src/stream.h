/* The test stream and UDP datagram schedule shared by guest and host.
 *
 * Must stay bit-identical to harness/net/stream.py (docs/DESIGN.md, "Test stream"):
 *   word n of the stream for seed s = splitmix64(s + n), stored little-endian.
 *   UDP: u = seed ^ UDP_SEED_XOR; datagram i has size 1 + splitmix64(u + 2^63 + i) % 1472
 *   and carries bytes [i*1472, i*1472 + size) of the stream for seed u.
 */
#ifndef HNET_STREAM_H
#define HNET_STREAM_H

#include <endian.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define UDP_MAX_PAYLOAD 1472u
#define UDP_SEED_XOR 0x5544505F53434844ull /* "UDP_SCHD": keeps UDP data distinct from TCP */
#define UDP_SIZE_BASE 0x8000000000000000ull /* sizes come from a far-away part of the stream */

static inline uint64_t splitmix64(uint64_t x)
{
	uint64_t z = x + 0x9E3779B97F4A7C15ull;
	z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
	z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
	return z ^ (z >> 31);
}

/* Fill buf with stream bytes [off, off + len). Whole words are generated in a tight loop;
 * only the ragged ends take the byte-copy path. */
static inline void stream_fill(uint64_t seed, uint64_t off, uint8_t *buf, size_t len)
{
	uint64_t n = off >> 3;
	unsigned skip = (unsigned)(off & 7);
	uint64_t w;

	if (skip && len) {
		size_t k = 8 - skip < len ? 8 - skip : len;
		w = htole64(splitmix64(seed + n));
		memcpy(buf, (uint8_t *)&w + skip, k);
		buf += k;
		len -= k;
		n++;
	}
	while (len >= 8) {
		w = htole64(splitmix64(seed + n));
		memcpy(buf, &w, 8);
		buf += 8;
		len -= 8;
		n++;
	}
	if (len) {
		w = htole64(splitmix64(seed + n));
		memcpy(buf, &w, len);
	}
}

static inline uint64_t udp_seed(uint64_t seed)
{
	return seed ^ UDP_SEED_XOR;
}

static inline size_t udp_size(uint64_t seed, uint64_t i)
{
	return 1 + (size_t)(splitmix64(udp_seed(seed) + UDP_SIZE_BASE + i) % UDP_MAX_PAYLOAD);
}

/* Writes datagram i into buf (room for UDP_MAX_PAYLOAD) and returns its size. */
static inline size_t udp_payload(uint64_t seed, uint64_t i, uint8_t *buf)
{
	size_t size = udp_size(seed, i);
	stream_fill(udp_seed(seed), i * UDP_MAX_PAYLOAD, buf, size);
	return size;
}

#endif
