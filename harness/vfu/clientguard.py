"""The client guard's C source, compiled into harness.vfu._vfu by harness.vfu.build.

What the guard does and why (socket timeouts on every accepted connection, error replies
counted by command, DMA_MAPs the device could never use refused) is in harness.vfu.build's
docstring, which its C comments point to; build.py links it with ``-Wl,--wrap`` of accept, recv,
recvmsg, sendmsg and dma_controller_add_region. ``WIRE_STRUCT`` is also part of build.py's cdef;
harness.vfu.wire reads the counters at run time. Plain strings only: build.py imports this
module before the extension exists.
"""

from __future__ import annotations

#: The client guard's counters, declared once for cffi's cdef ("..." lets cffi take the
#: array length from the C source) and for the C source itself.
WIRE_STRUCT = """typedef struct {
    uint64_t error_replies[HARNESS_NR_COMMANDS];
    uint64_t timeouts;
    uint64_t refused_maps;
    uint32_t last_cmd;
    int32_t last_errno;
    char last_refusal[128];
} harness_wire_t;
"""

#: Follows build.py's headers and harness_mb in the compiled source.
C_SOURCE = r"""
/* ---- the client guard (see the module docstring of harness.vfu.build) ------------------ */

/* Error replies are counted per command; slot 0 takes commands outside [1, 16). */
#define HARNESS_NR_COMMANDS 16
/* The device's DMA granule (harness.dma.GuestMemory) and the page size QEMU is told. */
#define HARNESS_DMA_GRANULE 4096

""" + WIRE_STRUCT + r"""
/* Single-threaded like libvfio-user itself: VfuContext takes these after each call into it. */
static harness_wire_t harness_wire;
static int harness_client_timeout_ms = 5000;

static void harness_set_client_timeout(int ms) { harness_client_timeout_ms = ms; }

static void harness_wire_take(harness_wire_t *out)
{
    *out = harness_wire;
    memset(&harness_wire, 0, sizeof(harness_wire));
}

int __real_accept(int fd, struct sockaddr *addr, socklen_t *len);
ssize_t __real_recv(int fd, void *buf, size_t len, int flags);
ssize_t __real_recvmsg(int fd, struct msghdr *msg, int flags);
ssize_t __real_sendmsg(int fd, const struct msghdr *msg, int flags);
int __real_dma_controller_add_region(void *dma, void *dma_addr, size_t size, int fd,
                                     off_t offset, uint32_t prot);

int __wrap_accept(int fd, struct sockaddr *addr, socklen_t *len)
{
    int conn = __real_accept(fd, addr, len);

    if (conn >= 0 && harness_client_timeout_ms > 0) {
        struct timeval tv = {
            .tv_sec = harness_client_timeout_ms / 1000,
            .tv_usec = (harness_client_timeout_ms % 1000) * 1000,
        };
        (void) setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        (void) setsockopt(conn, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
    }
    return conn;
}

/*
 * A blocking call on the client connection hit its timeout: the client stopped in the middle
 * of a message or stopped reading replies. Shut the connection down, so that whatever the
 * library does next on it sees EOF/EPIPE and ends in its own reset path (regions unregistered,
 * LOST_CONN reset, connection closed).
 */
static ssize_t harness_timed_out(int fd)
{
    harness_wire.timeouts++;
    (void) shutdown(fd, SHUT_RDWR);
    errno = ETIMEDOUT;
    return -1;
}

static bool harness_is_timeout(ssize_t ret, int flags)
{
    /* The connection is a blocking socket: EAGAIN there only ever means SO_*TIMEO expired. */
    return ret < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && !(flags & MSG_DONTWAIT);
}

ssize_t __wrap_recv(int fd, void *buf, size_t len, int flags)
{
    ssize_t ret = __real_recv(fd, buf, len, flags);
    return harness_is_timeout(ret, flags) ? harness_timed_out(fd) : ret;
}

ssize_t __wrap_recvmsg(int fd, struct msghdr *msg, int flags)
{
    ssize_t ret = __real_recvmsg(fd, msg, flags);
    return harness_is_timeout(ret, flags) ? harness_timed_out(fd) : ret;
}

ssize_t __wrap_sendmsg(int fd, const struct msghdr *msg, int flags)
{
    size_t total = 0;
    size_t i;
    ssize_t ret;

    /* tran_sock_send_iovec() puts the header alone in the first iovec. */
    if (msg->msg_iovlen > 0 &&
        msg->msg_iov[0].iov_len == sizeof(struct vfio_user_header)) {
        const struct vfio_user_header *hdr = msg->msg_iov[0].iov_base;
        if (hdr->flags.type == VFIO_USER_F_TYPE_REPLY && hdr->flags.error) {
            harness_wire.error_replies[hdr->cmd < HARNESS_NR_COMMANDS ? hdr->cmd : 0]++;
            harness_wire.last_cmd = hdr->cmd;
            harness_wire.last_errno = (int32_t)hdr->error_no;
        }
    }
    for (i = 0; i < msg->msg_iovlen; i++) {
        total += msg->msg_iov[i].iov_len;
    }
    ret = __real_sendmsg(fd, msg, flags);
    if (harness_is_timeout(ret, flags) ||
        (ret >= 0 && (size_t)ret < total && !(flags & MSG_DONTWAIT))) {
        /* SO_SNDTIMEO expired, before or after part of the message went out. */
        return harness_timed_out(fd);
    }
    return ret;
}

static const char *harness_dma_refusal(uint64_t iova, uint64_t size, int fd, off_t offset)
{
    struct stat st;

    if (size == 0) {
        return "size 0";
    }
    if (iova % HARNESS_DMA_GRANULE != 0 || size % HARNESS_DMA_GRANULE != 0) {
        return "not aligned to 4 KiB";
    }
    if (iova + (size - 1) < iova) {
        return "wraps past 2^64";
    }
    if (fd != -1) {
        if (offset < 0) {
            return "negative file offset";
        }
        if (fstat(fd, &st) == 0 && S_ISREG(st.st_mode) &&
            ((uint64_t)offset > (uint64_t)st.st_size ||
             size > (uint64_t)st.st_size - (uint64_t)offset)) {
            return "extends past the end of its file (touching it would be SIGBUS)";
        }
    }
    return NULL;
}

/* The fd of the DMA_MAP being added (see harness_close_duplicate_map_fd). */
static int harness_map_fd = -1;

/* handle_dma_map() -> here, before the library registers (and mmaps) the region. */
int __wrap_dma_controller_add_region(void *dma, void *dma_addr, size_t size, int fd,
                                     off_t offset, uint32_t prot)
{
    const char *why = harness_dma_refusal((uintptr_t)dma_addr, size, fd, offset);

    harness_map_fd = fd;
    if (why != NULL) {
        harness_wire.refused_maps++;
        snprintf(harness_wire.last_refusal, sizeof(harness_wire.last_refusal),
                 "DMA_MAP [%#llx, +%#llx) %s", (unsigned long long)(uintptr_t)dma_addr,
                 (unsigned long long)size, why);
        errno = EINVAL;
        return -1;
    }
    return __real_dma_controller_add_region(dma, dma_addr, size, fd, offset, prot);
}

/*
 * A DMA_MAP of exactly a live region: the library returns that region (which keeps its own
 * fd) and drops the new fd without closing it. The register callback, which runs right after
 * for that region, calls this to close it (a client repeating the map cannot leak fds).
 */
static void harness_close_duplicate_map_fd(void)
{
    if (harness_map_fd >= 0) {
        (void) close(harness_map_fd);
    }
    harness_map_fd = -1;
}
"""
