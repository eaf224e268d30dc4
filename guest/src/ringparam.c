/* ringparam: read or set a NIC's ring sizes in the guest, the part of `ethtool -g/-G` the
 * tests need (busybox has no ethtool). With virtio_net, setting a size different from the
 * current one makes Linux resize the virtqueue through VIRTIO_F_RING_RESET (virtnet_rx_resize /
 * virtnet_tx_resize: queue_reset, new ring, queue_enable), which is what tests/vm exercise.
 *
 * Usage: ringparam IFACE                 print the ring sizes
 *        ringparam IFACE rx N tx N       set them (either or both), then print them
 * Output: one line "rx=N tx=N rx_max=N tx_max=N". Failure: one stderr line, exit 1;
 * bad usage: exit 2.
 */
#include <errno.h>
#include <linux/ethtool.h>
#include <linux/sockios.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

static int ring_ioctl(int fd, const char *ifname, struct ethtool_ringparam *rp)
{
	struct ifreq ifr;

	memset(&ifr, 0, sizeof(ifr));
	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
	ifr.ifr_data = (void *)rp;
	return ioctl(fd, SIOCETHTOOL, &ifr);
}

/* ETHTOOL_GRINGPARAM into *rp; the error is printed here. */
static int get_rings(int fd, const char *ifname, struct ethtool_ringparam *rp)
{
	memset(rp, 0, sizeof(*rp));
	rp->cmd = ETHTOOL_GRINGPARAM;
	if (ring_ioctl(fd, ifname, rp) < 0) {
		fprintf(stderr, "ringparam: %s: get: %s\n", ifname, strerror(errno));
		return -1;
	}
	return 0;
}

static unsigned parse_size(const char *s)
{
	char *end;
	unsigned long v;

	errno = 0;
	v = strtoul(s, &end, 0);
	if (errno || *s == '\0' || *end != '\0' || v == 0 || v > 65535) {
		fprintf(stderr, "ringparam: bad ring size %s\n", s);
		exit(2);
	}
	return (unsigned)v;
}

int main(int argc, char **argv)
{
	struct ethtool_ringparam rp;
	int fd, i;

	if (argc < 2 || argc % 2 != 0 || strlen(argv[1]) >= IFNAMSIZ) {
		fprintf(stderr, "usage: ringparam IFACE [rx N] [tx N]\n");
		return 2;
	}
	fd = socket(AF_INET, SOCK_DGRAM, 0);
	if (fd < 0) {
		fprintf(stderr, "ringparam: socket: %s\n", strerror(errno));
		return 1;
	}
	if (get_rings(fd, argv[1], &rp) < 0)
		return 1;
	if (argc > 2) {
		for (i = 2; i < argc; i += 2) {
			if (strcmp(argv[i], "rx") == 0) {
				rp.rx_pending = parse_size(argv[i + 1]);
			} else if (strcmp(argv[i], "tx") == 0) {
				rp.tx_pending = parse_size(argv[i + 1]);
			} else {
				fprintf(stderr, "ringparam: unknown ring %s (rx or tx)\n", argv[i]);
				return 2;
			}
		}
		rp.cmd = ETHTOOL_SRINGPARAM;
		if (ring_ioctl(fd, argv[1], &rp) < 0) {
			fprintf(stderr, "ringparam: %s: set rx %u tx %u: %s\n", argv[1],
				rp.rx_pending, rp.tx_pending, strerror(errno));
			return 1;
		}
		if (get_rings(fd, argv[1], &rp) < 0)	/* what the driver made of it */
			return 1;
	}
	printf("rx=%u tx=%u rx_max=%u tx_max=%u\n", rp.rx_pending, rp.tx_pending,
	       rp.rx_max_pending, rp.tx_max_pending);
	close(fd);
	return 0;
}
