/* pykvm's C fast path: KVM_RUN and the exits that need no Python.
 *
 * pykvm_loop_run() calls KVM_RUN (cffi releases the GIL around it) and answers,
 * without returning to Python, the port-I/O and MMIO exits that a registered fast
 * handler covers: constant ports, byte registers a device model keeps current, debug-exit
 * ports and serial transmit.  Any other exit returns PYKVM_STOP_EXIT, decoded into the
 * loop's exit record (kvm_run is left as KVM filled it).
 *
 * Every function returns 0 (or a non-negative result) on success and -errno on
 * failure (the chain walk has codes of its own, below -4095 so that they are never
 * mistaken for an errno); none builds a Python object.
 *
 * The host is little-endian (x86-64): guest structures (virtqueue descriptors, port and
 * MMIO data) are read in place, in the host's byte order.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* fallocate() */
#endif
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "pykvm reads guest structures in place: the host must be little-endian"
#endif

#define PYKVM_FAST_MAX 16
#define PYKVM_EXIT_REASONS 64
#define PYKVM_ADDRESSES_KEPT 256  /* addresses counted one by one, per vCPU; the rest together */
#define PYKVM_ADDRESS_SLOTS 512   /* the hash table holding them, never more than half full */

enum pykvm_fast_kind { PYKVM_FAST_CONSTANT, PYKVM_FAST_DEBUG_EXIT, PYKVM_FAST_SERIAL_TX, PYKVM_FAST_BYTE_REGISTER };
enum pykvm_space { PYKVM_SPACE_PIO, PYKVM_SPACE_MMIO };
enum pykvm_stop { PYKVM_STOP_EXIT, PYKVM_STOP_DEBUG_EXIT, PYKVM_STOP_INTERRUPTED, PYKVM_STOP_REQUESTED };

#define PYKVM_SERIAL_FDS 2

/* Where the guest's serial output goes (see pykvm_serial_write); shared by every vCPU, so
 * every field is read and written with atomics. */
struct pykvm_serial_out {
    int fds[PYKVM_SERIAL_FDS]; /* -1: unused, or given up */
    uint32_t stalled[PYKVM_SERIAL_FDS];
    uint64_t stall_ns;
    uint64_t transmitted; /* bytes the guest sent */
    uint64_t dropped;     /* bytes an fd in use did not take (stalled, or a stop came) */
    uint64_t stalls;      /* times an fd was marked stalled */
    int error;            /* errno of the last fd given up */
};

struct pykvm_fast_handler {
    uint32_t kind;
    uint32_t space;
    uint32_t enabled;
    uint64_t base;
    uint64_t length;
    uint64_t value;
    struct pykvm_serial_out *serial;
    uint64_t reads;
    uint64_t writes;
};

/* Shared by every vCPU of a machine; counters are updated atomically. */
struct pykvm_fast_table {
    uint32_t count;
    struct pykvm_fast_handler handlers[PYKVM_FAST_MAX];
};

/* The exit pykvm_loop_run() returned for Python, decoded from kvm_run into plain fields.
 * Port I/O and MMIO: `count` accesses of `size` bytes at `address` (the port, or the
 * guest-physical address), packed in kvm_run at `data_offset` from its start, where a
 * read's answer goes before the vCPU runs again; `value` is a write's first access as a
 * little-endian integer.  Other exits carry only `reason`: Python reads the rest of kvm_run. */
struct pykvm_exit {
    uint32_t reason; /* KVM_EXIT_* */
    uint32_t is_write;
    uint64_t address;
    uint32_t size;
    uint32_t count;
    uint64_t value;
    uint64_t data_offset;
};
_Static_assert(offsetof(struct pykvm_exit, address) == 8 && offsetof(struct pykvm_exit, value) == 24
               && offsetof(struct pykvm_exit, data_offset) == 32 && sizeof(struct pykvm_exit) == 40,
               "Python unpacks the exit record as \"=IIQIIQQ\" (kvm/vcpu.py)");

/* Port-I/O and MMIO exits returned to Python to one address: `key` is
 * address << 2 | is_mmio << 1 | is_write. */
struct pykvm_address_count {
    uint64_t key;
    uint64_t count;
};

struct pykvm_loop {
    int vcpu_fd;
    struct kvm_run *run;
    struct pykvm_exit exit; /* filled when pykvm_loop_run() returns PYKVM_STOP_EXIT */
    uint32_t stop; /* set by another thread (then immediate_exit, then a kick signal) */
    struct pykvm_fast_table *table;
    uint64_t exits[PYKVM_EXIT_REASONS];
    uint64_t exit_count;  /* exits KVM_RUN returned, the fast ones included (an interrupted KVM_RUN is none) */
    uint64_t python_from; /* from this exit_count on, every exit returns to Python unanswered (0: never) */
    uint64_t fast_exits;
    uint64_t guest_ns;
    uint64_t fast_ns;
    uint64_t python_ns;   /* from each exit returned to Python to the next call of the loop */
    uint64_t python_since; /* when the last exit was returned to Python (0: none pending) */
    uint64_t debug_exit_value;
    struct pykvm_address_count addresses[PYKVM_ADDRESSES_KEPT]; /* in the order they were first seen */
    uint32_t addresses_kept;
    uint64_t other_addresses;                 /* accesses to addresses beyond the first PYKVM_ADDRESSES_KEPT */
    uint16_t address_slots[PYKVM_ADDRESS_SLOTS]; /* a hash table of 1 + indices into addresses (0: empty) */
};

struct pykvm_guest_memory;
struct pykvm_buffer;

/* What Python calls (declared again for cffi in _native.h). */
int pykvm_ioctl(int fd, unsigned long request, void *arg);
int pykvm_ioctl_value(int fd, unsigned long request, unsigned long value);
int pykvm_fallocate(int fd, int mode, int64_t offset, int64_t length);
uint8_t *pykvm_io_data(struct kvm_run *run);
struct kvm_regs *pykvm_sync_regs(struct kvm_run *run);
int pykvm_install_kick_handler(int signo);
int pykvm_loop_run(struct pykvm_loop *loop);
int pykvm_chain_walk(const struct pykvm_guest_memory *mem, uint64_t desc_table, uint32_t queue_size,
                     uint32_t head, int indirect_ok, struct pykvm_buffer *out, uint32_t max_out);
int64_t pykvm_save_pages(int fd, const uint8_t *mem, uint64_t length, uint64_t file_offset, int pagemap_fd);
void pykvm_note_written(const struct pykvm_guest_memory *mem, uint64_t gpa, uint64_t length);
void pykvm_take_written(uint64_t *bitmap, uint64_t *copy, uint64_t words);
int pykvm_serial_write(struct pykvm_serial_out *out, const uint32_t *stop, const uint8_t *data, size_t len);
struct pykvm_blk;
int pykvm_blk_serve(struct pykvm_blk *blk, uint32_t limit);

int pykvm_ioctl(int fd, unsigned long request, void *arg)
{
    int ret = ioctl(fd, request, arg);
    return ret < 0 ? -errno : ret;
}

int pykvm_ioctl_value(int fd, unsigned long request, unsigned long value)
{
    int ret = ioctl(fd, request, value);
    return ret < 0 ? -errno : ret;
}

/* fallocate(2) with a mode (PUNCH_HOLE, ZERO_RANGE...), which Python's os module lacks. */
int pykvm_fallocate(int fd, int mode, int64_t offset, int64_t length)
{
    return fallocate(fd, mode, offset, length) < 0 ? -errno : 0;
}

uint8_t *pykvm_io_data(struct kvm_run *run)
{
    return (uint8_t *)run + run->io.data_offset;
}

struct kvm_regs *pykvm_sync_regs(struct kvm_run *run)
{
    return &run->s.regs.regs;
}

static void kick_handler(int signo)
{
    (void)signo; /* its only job is to make KVM_RUN return EINTR */
}

/* Install a no-op handler for the signal that kicks a vCPU out of KVM_RUN. */
int pykvm_install_kick_handler(int signo)
{
    struct sigaction action;

    memset(&action, 0, sizeof(action));
    action.sa_handler = kick_handler;
    sigemptyset(&action.sa_mask);
    return sigaction(signo, &action, NULL) < 0 ? -errno : 0;
}

static uint64_t now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static struct pykvm_fast_handler *find_handler(struct pykvm_fast_table *table, uint32_t space, uint64_t addr)
{
    if (!table)
        return NULL;
    for (uint32_t i = 0; i < table->count && i < PYKVM_FAST_MAX; i++) {
        struct pykvm_fast_handler *h = &table->handlers[i];

        if (h->enabled && h->space == space && addr >= h->base && addr - h->base < h->length)
            return h;
    }
    return NULL;
}

/* ---- serial output --------------------------------------------------------------------
 *
 * pykvm_serial_write() copies what the guest transmits to the output fds, for the C fast path
 * and for Python's devices alike, so that both behave the same:
 * - a stop request always wins: while an fd cannot take more, the write waits in poll() slices
 *   and gives up as soon as *stop is set (a vCPU thread is also kicked out of poll());
 * - an fd that takes nothing for stall_ns (a pipe nobody reads) is marked stalled: from then on
 *   what it cannot take at once is dropped, until it takes bytes again;
 * - an fd whose write fails, or writes nothing, is given up and its errno kept.
 * Bytes an fd in use did not take are counted in `dropped`.
 */
#define PYKVM_SERIAL_CHUNK 4096 /* PIPE_BUF: a pipe that poll() calls writable takes it at once */
#define PYKVM_SERIAL_SLICE_MS 100

static void give_up_fd(struct pykvm_serial_out *out, int i, int err)
{
    __atomic_store_n(&out->error, err, __ATOMIC_RELAXED);
    __atomic_store_n(&out->fds[i], -1, __ATOMIC_RELAXED);
}

static int output_fd(const struct pykvm_serial_out *out, int i)
{
    return __atomic_load_n(&out->fds[i], __ATOMIC_RELAXED);
}

static int is_stalled(const struct pykvm_serial_out *out, int i)
{
    return __atomic_load_n(&out->stalled[i], __ATOMIC_RELAXED) != 0;
}

static int stop_requested(const uint32_t *stop)
{
    return stop && __atomic_load_n(stop, __ATOMIC_RELAXED);
}

/* Write to output fd i; returns how many bytes it took. */
static size_t serial_write_fd(struct pykvm_serial_out *out, int i, const uint32_t *stop,
                              const uint8_t *data, size_t len)
{
    size_t done = 0;
    uint64_t waiting_since = 0;

    int fd;

    while (done < len && (fd = output_fd(out, i)) >= 0) {
        struct pollfd pfd = { .fd = fd, .events = POLLOUT };
        int ready = poll(&pfd, 1, is_stalled(out, i) ? 0 : PYKVM_SERIAL_SLICE_MS);

        if (ready > 0) { /* writable, or an error that write() reports */
            size_t chunk = len - done < PYKVM_SERIAL_CHUNK ? len - done : PYKVM_SERIAL_CHUNK;
            ssize_t n = write(fd, data + done, chunk);

            if (n > 0) {
                done += (size_t)n;
                __atomic_store_n(&out->stalled[i], 0, __ATOMIC_RELAXED);
                waiting_since = 0;
                continue;
            }
            if (n == 0) { /* took nothing and said nothing: retrying would spin */
                give_up_fd(out, i, EIO);
                break;
            }
            if (errno != EINTR && errno != EAGAIN) {
                give_up_fd(out, i, errno);
                break;
            }
        } else if (ready < 0 && errno != EINTR) {
            give_up_fd(out, i, errno);
            break;
        }
        if (is_stalled(out, i) || stop_requested(stop))
            break;
        if (!waiting_since) {
            waiting_since = now_ns();
        } else if (now_ns() - waiting_since >= out->stall_ns) {
            __atomic_store_n(&out->stalled[i], 1, __ATOMIC_RELAXED);
            __atomic_add_fetch(&out->stalls, 1, __ATOMIC_RELAXED);
            break;
        }
    }
    return done;
}

int pykvm_serial_write(struct pykvm_serial_out *out, const uint32_t *stop, const uint8_t *data, size_t len)
{
    __atomic_add_fetch(&out->transmitted, len, __ATOMIC_RELAXED);
    for (int i = 0; i < PYKVM_SERIAL_FDS; i++) {
        if (output_fd(out, i) < 0)
            continue;
        size_t done = serial_write_fd(out, i, stop, data, len);

        if (done < len && output_fd(out, i) >= 0)
            __atomic_add_fetch(&out->dropped, len - done, __ATOMIC_RELAXED);
    }
    return 0;
}

static uint64_t little_endian(const uint8_t *data, uint32_t size)
{
    uint64_t value = 0;

    for (uint32_t i = 0; i < size && i < 8; i++)
        value |= (uint64_t)data[i] << (8 * i);
    return value;
}

static void fill_constant(uint8_t *data, uint64_t value, uint32_t size, uint32_t count)
{
    for (uint32_t i = 0; i < count; i++)
        for (uint32_t b = 0; b < size; b++)
            data[i * size + b] = b < 8 ? (uint8_t)(value >> (8 * b)) : 0xff;
}

/* Answer one access with a fast handler.  Returns 1 to keep running, 0 to stop
 * (debug exit), -1 when the handler does not cover this access (Python must). */
static int fast_access(struct pykvm_loop *loop, struct pykvm_fast_handler *h, int is_write,
                       uint8_t *data, uint32_t size, uint32_t count)
{
    if (!is_write) {
        if (h->kind == PYKVM_FAST_SERIAL_TX || (h->kind == PYKVM_FAST_BYTE_REGISTER && size != 1))
            return -1; /* a wider read also reaches the next registers: Python */
        uint64_t value = h->kind == PYKVM_FAST_DEBUG_EXIT ? 0 : __atomic_load_n(&h->value, __ATOMIC_RELAXED);

        fill_constant(data, value, size, count);
        __atomic_add_fetch(&h->reads, 1, __ATOMIC_RELAXED);
        return 1;
    }
    switch (h->kind) {
    case PYKVM_FAST_CONSTANT:
        break;
    case PYKVM_FAST_DEBUG_EXIT:
        loop->debug_exit_value = little_endian(data, size);
        __atomic_add_fetch(&h->writes, 1, __ATOMIC_RELAXED);
        return 0;
    case PYKVM_FAST_SERIAL_TX:
        if (size != 1)
            return -1; /* a wider access also reaches the next registers: Python */
        if (h->serial)
            pykvm_serial_write(h->serial, &loop->stop, data, count);
        break;
    default:
        return -1;
    }
    __atomic_add_fetch(&h->writes, 1, __ATOMIC_RELAXED);
    return 1;
}

static int handle_fast(struct pykvm_loop *loop)
{
    struct kvm_run *run = loop->run;
    struct pykvm_fast_handler *h;

    if (run->exit_reason == KVM_EXIT_IO) {
        h = find_handler(loop->table, PYKVM_SPACE_PIO, run->io.port);
        if (!h)
            return -1;
        return fast_access(loop, h, run->io.direction == KVM_EXIT_IO_OUT, pykvm_io_data(run),
                           run->io.size, run->io.count);
    }
    if (run->exit_reason == KVM_EXIT_MMIO) {
        h = find_handler(loop->table, PYKVM_SPACE_MMIO, run->mmio.phys_addr);
        if (!h || run->mmio.len > sizeof(run->mmio.data))
            return -1;
        return fast_access(loop, h, run->mmio.is_write, run->mmio.data, run->mmio.len, 1);
    }
    return -1;
}

/* Count an access returned to Python under its address: the first PYKVM_ADDRESSES_KEPT
 * addresses each in an entry of their own (found through a hash table: open addressing,
 * linear probing), the others together, so that a guest scanning the address space cannot
 * grow the table. */
static void count_address(struct pykvm_loop *loop, uint64_t address, int is_mmio, int is_write)
{
    uint64_t key = address << 2 | (uint64_t)is_mmio << 1 | (uint64_t)is_write;
    uint32_t slot = (uint32_t)((key * 0x9E3779B97F4A7C15ull) >> 55); /* Fibonacci hashing, 9 bits */

    _Static_assert(PYKVM_ADDRESS_SLOTS == 1 << 9, "the hash gives 9 bits");
    _Static_assert(PYKVM_ADDRESSES_KEPT < PYKVM_ADDRESS_SLOTS, "a probe must always find an empty slot");
    for (;; slot = (slot + 1) % PYKVM_ADDRESS_SLOTS) {
        uint16_t index = loop->address_slots[slot];

        if (index && loop->addresses[index - 1].key == key) {
            loop->addresses[index - 1].count++;
            return;
        }
        if (!index) {
            if (loop->addresses_kept >= PYKVM_ADDRESSES_KEPT) {
                loop->other_addresses++;
                return;
            }
            loop->addresses[loop->addresses_kept] = (struct pykvm_address_count){ .key = key, .count = 1 };
            loop->address_slots[slot] = (uint16_t)++loop->addresses_kept;
            return;
        }
    }
}

/* Fill loop->exit from kvm_run for Python. */
static void decode_exit(struct pykvm_loop *loop)
{
    struct kvm_run *run = loop->run;
    struct pykvm_exit *exit = &loop->exit;
    uint8_t *data;

    *exit = (struct pykvm_exit){ .reason = run->exit_reason };
    if (run->exit_reason == KVM_EXIT_IO) {
        exit->is_write = run->io.direction == KVM_EXIT_IO_OUT;
        exit->address = run->io.port;
        exit->size = run->io.size;
        exit->count = run->io.count;
        data = pykvm_io_data(run);
    } else if (run->exit_reason == KVM_EXIT_MMIO) {
        exit->is_write = run->mmio.is_write;
        exit->address = run->mmio.phys_addr;
        exit->size = run->mmio.len <= sizeof(run->mmio.data) ? run->mmio.len : sizeof(run->mmio.data);
        exit->count = 1;
        data = run->mmio.data;
    } else {
        return;
    }
    exit->data_offset = (uint64_t)(data - (uint8_t *)run);
    if (exit->is_write)
        exit->value = little_endian(data, exit->size);
    count_address(loop, exit->address, run->exit_reason == KVM_EXIT_MMIO, exit->is_write);
}

int pykvm_loop_run(struct pykvm_loop *loop)
{
    if (loop->python_since) {
        loop->python_ns += now_ns() - loop->python_since;
        loop->python_since = 0;
    }
    for (;;) {
        uint64_t start, entered;

        /* Clear immediate_exit, then look at the stop flag: a thread that sets the flag and
         * then immediate_exit cannot be missed whichever way the two interleave.  The fence
         * keeps the load from passing the store (x86 may reorder a store with a later load). */
        loop->run->immediate_exit = 0;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&loop->stop, __ATOMIC_RELAXED))
            return PYKVM_STOP_REQUESTED;
        start = now_ns();
        int ret = ioctl(loop->vcpu_fd, KVM_RUN, 0);
        int err = errno, handled;

        entered = now_ns();
        loop->guest_ns += entered - start;
        if (ret < 0) {
            if (err == EINTR)
                return PYKVM_STOP_INTERRUPTED;
            if (err == EAGAIN) /* an AP woken while it waits for SIPI: run again */
                continue;
            return -err;
        }
        /* the last slot counts reasons newer than this table */
        loop->exits[loop->run->exit_reason < PYKVM_EXIT_REASONS ? loop->run->exit_reason : PYKVM_EXIT_REASONS - 1]++;
        loop->exit_count++;
        if ((loop->python_from && loop->exit_count >= loop->python_from) || (handled = handle_fast(loop)) < 0) {
            decode_exit(loop);
            loop->python_since = entered;
            return PYKVM_STOP_EXIT;
        }
        loop->fast_exits++;
        loop->fast_ns += now_ns() - entered;
        if (handled == 0)
            return PYKVM_STOP_DEBUG_EXIT;
    }
}

/* ---- virtqueue descriptor chains (virtio 1.2, 2.7.5) --------------------------------
 *
 * pykvm_chain_walk() follows one chain of a split virtqueue and returns its buffers
 * with their host addresses.  Every descriptor table and every buffer is checked to lie
 * wholly inside one region of guest RAM before anything is read through it; the walk is
 * bounded (at most queue_size hops, or the indirect table's size inside one), an
 * indirect descriptor inside an indirect table is refused, and so is a chain whose
 * lengths add up past 2^32 - 1.  On any violation it returns a negative PYKVM_CHAIN_*
 * code and the device treats the request as malformed.
 */
#define PYKVM_MEM_REGIONS_MAX 8
#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_DESC_SIZE 16

/* Below -4095 (Linux's MAX_ERRNO): a chain error is never mistaken for an errno. */
#define PYKVM_CHAIN_ERROR(n) (-4096 - (n))
enum pykvm_chain_error {
    PYKVM_CHAIN_BAD_HEAD = PYKVM_CHAIN_ERROR(0),            /* head index >= queue size */
    PYKVM_CHAIN_BAD_TABLE = PYKVM_CHAIN_ERROR(1),           /* a descriptor table is not inside guest RAM */
    PYKVM_CHAIN_BAD_BUFFER = PYKVM_CHAIN_ERROR(2),          /* a buffer is not inside guest RAM */
    PYKVM_CHAIN_TOO_LONG = PYKVM_CHAIN_ERROR(3),            /* more hops than descriptors: a loop */
    PYKVM_CHAIN_BAD_NEXT = PYKVM_CHAIN_ERROR(4),            /* a next index outside the table */
    PYKVM_CHAIN_NESTED_INDIRECT = PYKVM_CHAIN_ERROR(5),     /* an indirect descriptor in an indirect table */
    PYKVM_CHAIN_BAD_INDIRECT = PYKVM_CHAIN_ERROR(6),        /* indirect table length 0, not a multiple of 16, or with NEXT */
    PYKVM_CHAIN_TOO_MANY_BUFFERS = PYKVM_CHAIN_ERROR(7),    /* more buffers than the caller has room for */
    PYKVM_CHAIN_TOO_LARGE = PYKVM_CHAIN_ERROR(8),           /* lengths add up past 2^32 - 1 */
    PYKVM_CHAIN_INDIRECT_NOT_NEGOTIATED = PYKVM_CHAIN_ERROR(9), /* an indirect descriptor without VIRTIO_F_INDIRECT_DESC */
};
_Static_assert(PYKVM_CHAIN_ERROR(0) < -4095, "chain errors must not look like -errno (MAX_ERRNO is 4095)");

struct pykvm_mem_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t host;
    uint64_t *written; /* while host writes are tracked: one bit per page the host wrote (else NULL) */
};

struct pykvm_guest_memory {
    uint32_t count;
    struct pykvm_mem_region regions[PYKVM_MEM_REGIONS_MAX];
};

struct pykvm_buffer {
    uint64_t gpa;
    uint64_t host;
    uint32_t len;
    uint32_t writable;
};

struct pykvm_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};
_Static_assert(sizeof(struct pykvm_desc) == VIRTQ_DESC_SIZE, "a split virtqueue descriptor is 16 bytes (2.7.5)");

/* The host address of [gpa, gpa + len), or 0 if it is not wholly inside one region. */
static uint64_t guest_host_address(const struct pykvm_guest_memory *mem, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < mem->count && i < PYKVM_MEM_REGIONS_MAX; i++) {
        const struct pykvm_mem_region *r = &mem->regions[i];

        if (gpa >= r->gpa && gpa - r->gpa <= r->size && len <= r->size - (gpa - r->gpa))
            return r->host + (gpa - r->gpa);
    }
    return 0;
}

/* ---- guest pages written by the host --------------------------------------------------------
 *
 * KVM's dirty log sees the guest's writes only.  While GuestMemory.track_host_writes() is on,
 * each region has a bitmap of its pages, and whatever writes guest memory outside the guest
 * marks it: the devices here in C, Python's through pykvm_note_written().  Bits are set and
 * taken atomically, so a device may write while another thread takes the pages written.
 */
#define PYKVM_PAGE_SHIFT 12

/* Note that the host wrote [gpa, gpa + length) (the part of it inside guest RAM). */
void pykvm_note_written(const struct pykvm_guest_memory *mem, uint64_t gpa, uint64_t length)
{
    for (uint32_t i = 0; length && i < mem->count && i < PYKVM_MEM_REGIONS_MAX; i++) {
        const struct pykvm_mem_region *r = &mem->regions[i];

        if (!r->written || gpa < r->gpa || gpa - r->gpa >= r->size)
            continue;
        uint64_t first = (gpa - r->gpa) >> PYKVM_PAGE_SHIFT;
        uint64_t end = gpa - r->gpa + (length < r->size - (gpa - r->gpa) ? length : r->size - (gpa - r->gpa));

        for (uint64_t page = first; page <= (end - 1) >> PYKVM_PAGE_SHIFT; page++)
            __atomic_fetch_or(&r->written[page / 64], 1ull << (page % 64), __ATOMIC_RELAXED);
        return;
    }
}

/* Move `words` words of a written-page bitmap into `copy`, leaving zeros. */
void pykvm_take_written(uint64_t *bitmap, uint64_t *copy, uint64_t words)
{
    for (uint64_t i = 0; i < words; i++)
        copy[i] = __atomic_exchange_n(&bitmap[i], 0, __ATOMIC_RELAXED);
}

static void read_desc(uint64_t table_host, uint32_t index, struct pykvm_desc *desc)
{
    /* volatile: the guest may change the table under us; read each descriptor exactly once */
    const volatile uint8_t *src = (const volatile uint8_t *)(uintptr_t)(table_host + (uint64_t)index * VIRTQ_DESC_SIZE);
    uint8_t raw[VIRTQ_DESC_SIZE];

    for (int i = 0; i < VIRTQ_DESC_SIZE; i++)
        raw[i] = src[i];
    memcpy(desc, raw, sizeof(*desc));
}

struct chain_walk {
    const struct pykvm_guest_memory *mem;
    struct pykvm_buffer *out;
    uint32_t max_out;
    uint32_t count;
    uint64_t total;
};

static int add_buffer(struct chain_walk *walk, const struct pykvm_desc *desc)
{
    uint64_t host = guest_host_address(walk->mem, desc->addr, desc->len);

    if (!host && desc->len)
        return PYKVM_CHAIN_BAD_BUFFER;
    if (walk->count >= walk->max_out)
        return PYKVM_CHAIN_TOO_MANY_BUFFERS;
    walk->total += desc->len;
    if (walk->total > UINT32_MAX)
        return PYKVM_CHAIN_TOO_LARGE;
    walk->out[walk->count++] = (struct pykvm_buffer){
        .gpa = desc->addr, .host = host, .len = desc->len,
        .writable = (desc->flags & VIRTQ_DESC_F_WRITE) != 0,
    };
    return 0;
}

/* Walk the descriptors of one table from `index`, following NEXT, at most `entries` hops. */
static int walk_table(struct chain_walk *walk, uint64_t table_host, uint32_t entries, uint32_t index,
                      int in_indirect, int indirect_ok, uint64_t *indirect_gpa, uint32_t *indirect_len)
{
    for (uint32_t hops = 0;; hops++) {
        struct pykvm_desc desc;
        int err;

        if (hops >= entries)
            return PYKVM_CHAIN_TOO_LONG;
        read_desc(table_host, index, &desc);
        if (desc.flags & VIRTQ_DESC_F_INDIRECT) {
            if (in_indirect)
                return PYKVM_CHAIN_NESTED_INDIRECT;
            if (!indirect_ok)
                return PYKVM_CHAIN_INDIRECT_NOT_NEGOTIATED;
            if ((desc.flags & VIRTQ_DESC_F_NEXT) || desc.len == 0 || desc.len % VIRTQ_DESC_SIZE)
                return PYKVM_CHAIN_BAD_INDIRECT;
            *indirect_gpa = desc.addr; /* the indirect table ends this chain */
            *indirect_len = desc.len;
            return 0;
        }
        err = add_buffer(walk, &desc);
        if (err)
            return err;
        if (!(desc.flags & VIRTQ_DESC_F_NEXT))
            return 0;
        if (desc.next >= entries)
            return PYKVM_CHAIN_BAD_NEXT;
        index = desc.next;
    }
}

int pykvm_chain_walk(const struct pykvm_guest_memory *mem, uint64_t desc_table, uint32_t queue_size,
                     uint32_t head, int indirect_ok, struct pykvm_buffer *out, uint32_t max_out)
{
    struct chain_walk walk = { .mem = mem, .out = out, .max_out = max_out };
    uint64_t table_host, indirect_gpa = 0;
    uint32_t indirect_len = 0;
    int err;

    if (head >= queue_size)
        return PYKVM_CHAIN_BAD_HEAD;
    table_host = guest_host_address(mem, desc_table, (uint64_t)queue_size * VIRTQ_DESC_SIZE);
    if (!table_host)
        return PYKVM_CHAIN_BAD_TABLE;
    err = walk_table(&walk, table_host, queue_size, head, 0, indirect_ok, &indirect_gpa, &indirect_len);
    if (err)
        return err;
    if (indirect_len) {
        table_host = guest_host_address(mem, indirect_gpa, indirect_len);
        if (!table_host)
            return PYKVM_CHAIN_BAD_TABLE;
        err = walk_table(&walk, table_host, indirect_len / VIRTQ_DESC_SIZE, 0, 1, 1, &indirect_gpa, &indirect_len);
        if (err)
            return err;
    }
    return (int)walk.count;
}

/* ---- virtio-blk: the plain requests (virtio 1.2, 5.2.6) ---------------------------------
 *
 * pykvm_blk_serve() serves, in the order the driver made them available, the requests of a
 * virtio-blk queue that need nothing but the image file: IN (preadv into the guest's buffers),
 * OUT (pwritev from them, then fdatasync if the driver did not negotiate FLUSH) and FLUSH
 * (fsync), each answered in its status byte and completed in the used ring.  It stops, without
 * taking it, at the first available chain it does not serve that way: one the walk refuses, one
 * whose layout or bounds are wrong, another request type, one whose transfer fails.  Python
 * (devices/virtio/blk.py, the reference for every rule here) pops and answers that one.  A
 * failed sync is answered here, IOERR: the kernel reports its error once, so a second try could
 * succeed over lost data.  The caller holds the device's lock; the queue passed its checks
 * (SplitQueue.check) when the driver made it ready.
 */
#define PYKVM_BLK_BUFFERS_MAX 256
#define VIRTIO_BLK_HEADER 16
#define VIRTIO_BLK_SECTOR 512
#define VIRTIO_BLK_T_IN 0
#define VIRTIO_BLK_T_OUT 1
#define VIRTIO_BLK_T_FLUSH 4
#define VIRTIO_BLK_S_OK 0
#define VIRTIO_BLK_S_IOERR 1

enum pykvm_blk_counter {
    PYKVM_BLK_READS, PYKVM_BLK_WRITES, PYKVM_BLK_BYTES_READ, PYKVM_BLK_BYTES_WRITTEN, PYKVM_BLK_FLUSHES,
    PYKVM_BLK_WRITE_THROUGH_SYNCS, PYKVM_BLK_ERRORS, PYKVM_BLK_IO_ERRORS, PYKVM_BLK_COUNTERS
};

struct pykvm_blk {
    const struct pykvm_guest_memory *mem;
    int fd;
    uint32_t read_only;
    uint32_t write_through;  /* FLUSH not negotiated: a write completes once fdatasync() returned */
    uint32_t seg_max;        /* data segments per request */
    uint64_t max_bytes;      /* data bytes per request */
    uint64_t capacity;       /* in sectors */
    uint64_t desc_table, avail_ring, used_ring;
    uint32_t size;
    uint32_t indirect;
    uint32_t event_idx;
    uint16_t next_avail, next_used; /* the queue's positions, taken and given back */
    struct pykvm_buffer *buffers;   /* room for `size` buffers */
    uint64_t counts[PYKVM_BLK_COUNTERS]; /* what the last call did */
    int sync_errno;                 /* why the last call's last failed sync failed (0: none failed) */
    uint32_t python_next;           /* 0 if the last call found nothing more available; else Python
                                     * looks at the ring next (a chain or an index C leaves to it) */
    struct iovec iov[PYKVM_BLK_BUFFERS_MAX]; /* the data of one request, and where it is in the guest */
    uint64_t iov_gpa[PYKVM_BLK_BUFFERS_MAX];
};

/* One request's chain, cut into its parts (2.6.4: however the driver split it into buffers). */
struct blk_request {
    struct pykvm_buffer *buffers;
    uint32_t count;
    uint32_t first_writable;
    uint64_t readable, writable; /* bytes */
};

/* Point iov at bytes [from, from + length) of buffers [first, last); returns the entries used. */
static uint32_t blk_iov(struct pykvm_blk *blk, const struct blk_request *req, uint32_t first, uint32_t last,
                        uint64_t from, uint64_t length)
{
    uint32_t n = 0;

    for (uint32_t i = first; i < last && length; i++) {
        const struct pykvm_buffer *b = &req->buffers[i];

        if (from >= b->len) {
            from -= b->len;
            continue;
        }
        uint64_t take = b->len - from < length ? b->len - from : length;

        blk->iov[n] = (struct iovec){ .iov_base = (void *)(uintptr_t)(b->host + from), .iov_len = take };
        blk->iov_gpa[n++] = b->gpa + from;
        from = 0;
        length -= take;
    }
    return n;
}

/* preadv/pwritev until `length` bytes moved; returns how many did (fewer on an error or end of file). */
static uint64_t blk_transfer(struct pykvm_blk *blk, int write, uint32_t iovcnt, uint64_t offset, uint64_t length)
{
    struct iovec *iov = blk->iov;
    uint64_t done = 0;

    while (done < length) {
        ssize_t n = write ? pwritev(blk->fd, iov, (int)iovcnt, (off_t)(offset + done))
                          : preadv(blk->fd, iov, (int)iovcnt, (off_t)(offset + done));

        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        done += (uint64_t)n;
        while (n > 0 && iovcnt) { /* skip what moved */
            size_t step = (size_t)n < iov->iov_len ? (size_t)n : iov->iov_len;

            iov->iov_base = (uint8_t *)iov->iov_base + step;
            iov->iov_len -= step;
            n -= (ssize_t)step;
            if (!iov->iov_len) {
                iov++;
                iovcnt--;
            }
        }
    }
    return done;
}

static int blk_in_range(const struct pykvm_blk *blk, uint64_t sector, uint64_t length)
{
    return length % VIRTIO_BLK_SECTOR == 0 && length <= blk->max_bytes && sector <= blk->capacity
           && length / VIRTIO_BLK_SECTOR <= blk->capacity - sector;
}

static int blk_sync(struct pykvm_blk *blk, int (*sync)(int), enum pykvm_blk_counter counter)
{
    if (sync(blk->fd) == 0) {
        blk->counts[counter]++;
        return VIRTIO_BLK_S_OK;
    }
    blk->sync_errno = errno;
    blk->counts[PYKVM_BLK_ERRORS]++;
    blk->counts[PYKVM_BLK_IO_ERRORS]++;
    return VIRTIO_BLK_S_IOERR;
}

/* Carry out an IN, OUT or FLUSH request: its status, or -1 if Python must (the request stays
 * untaken); *data_in = the bytes read into the chain. */
static int blk_execute(struct pykvm_blk *blk, const struct blk_request *req, uint64_t *data_in)
{
    uint8_t header[VIRTIO_BLK_HEADER];
    uint32_t type, iovcnt;
    uint64_t sector, length;

    /* the header: the first 16 readable bytes, read once (the guest may change them) */
    iovcnt = blk_iov(blk, req, 0, req->first_writable, 0, VIRTIO_BLK_HEADER);
    for (uint32_t i = 0, at = 0; i < iovcnt; at += (uint32_t)blk->iov[i++].iov_len)
        memcpy(header + at, blk->iov[i].iov_base, blk->iov[i].iov_len);
    memcpy(&type, header, sizeof(type));
    memcpy(&sector, header + 8, sizeof(sector));
    *data_in = 0;
    switch (type) {
    case VIRTIO_BLK_T_IN:
        length = req->writable - 1; /* all but the status byte */
        if (req->readable != VIRTIO_BLK_HEADER || !blk_in_range(blk, sector, length))
            return -1;
        iovcnt = blk_iov(blk, req, req->first_writable, req->count, 0, length);
        if (blk_transfer(blk, 0, iovcnt, sector * VIRTIO_BLK_SECTOR, length) < length)
            return -1;
        iovcnt = blk_iov(blk, req, req->first_writable, req->count, 0, length); /* blk_transfer moved them */
        for (uint32_t i = 0; i < iovcnt; i++)
            pykvm_note_written(blk->mem, blk->iov_gpa[i], blk->iov[i].iov_len);
        blk->counts[PYKVM_BLK_READS]++;
        blk->counts[PYKVM_BLK_BYTES_READ] += length;
        *data_in = length;
        return VIRTIO_BLK_S_OK;
    case VIRTIO_BLK_T_OUT:
        length = req->readable - VIRTIO_BLK_HEADER;
        if (req->writable != 1 || blk->read_only || !blk_in_range(blk, sector, length))
            return -1;
        iovcnt = blk_iov(blk, req, 0, req->first_writable, VIRTIO_BLK_HEADER, length);
        if (blk_transfer(blk, 1, iovcnt, sector * VIRTIO_BLK_SECTOR, length) < length)
            return -1;
        blk->counts[PYKVM_BLK_WRITES]++;
        blk->counts[PYKVM_BLK_BYTES_WRITTEN] += length;
        return blk->write_through ? blk_sync(blk, fdatasync, PYKVM_BLK_WRITE_THROUGH_SYNCS) : VIRTIO_BLK_S_OK;
    case VIRTIO_BLK_T_FLUSH:
        return blk_sync(blk, fsync, PYKVM_BLK_FLUSHES);
    default:
        return -1;
    }
}

/* Serve the chain at `head`: 1 and its used length, or 0 if it is Python's to serve. */
static int blk_serve_chain(struct pykvm_blk *blk, uint16_t head, uint32_t *used_len)
{
    struct blk_request req = { .buffers = blk->buffers };
    int count = pykvm_chain_walk(blk->mem, blk->desc_table, blk->size, head, (int)blk->indirect, blk->buffers,
                                 blk->size);
    uint64_t data_in;
    int status;

    if (count <= 0)
        return 0;
    for (int i = 0; i < count; i++) /* zero-length buffers carry nothing (Python drops them too) */
        if (blk->buffers[i].len)
            blk->buffers[req.count++] = blk->buffers[i];
    if (!req.count || req.count > blk->seg_max + 2 || req.count > PYKVM_BLK_BUFFERS_MAX)
        return 0;
    while (req.first_writable < req.count && !req.buffers[req.first_writable].writable)
        req.readable += req.buffers[req.first_writable++].len;
    for (uint32_t i = req.first_writable; i < req.count; i++) {
        if (!req.buffers[i].writable)
            return 0; /* a readable buffer after a writable one */
        req.writable += req.buffers[i].len;
    }
    if (!req.writable || req.readable < VIRTIO_BLK_HEADER)
        return 0; /* no status byte, or no whole header */
    status = blk_execute(blk, &req, &data_in);
    if (status < 0)
        return 0;
    const struct pykvm_buffer *last = &req.buffers[req.count - 1];

    *(volatile uint8_t *)(uintptr_t)(last->host + last->len - 1) = (uint8_t)status;
    pykvm_note_written(blk->mem, last->gpa + last->len - 1, 1);
    *used_len = (uint32_t)(data_in + 1);
    return 1;
}

int pykvm_blk_serve(struct pykvm_blk *blk, uint32_t limit)
{
    uint64_t avail_bytes = 4 + 2 * (uint64_t)blk->size + 2, used_bytes = 4 + 8 * (uint64_t)blk->size + 2;
    uint8_t *avail = (uint8_t *)(uintptr_t)guest_host_address(blk->mem, blk->avail_ring, avail_bytes);
    uint8_t *used = (uint8_t *)(uintptr_t)guest_host_address(blk->mem, blk->used_ring, used_bytes);
    uint32_t served = 0;

    memset(blk->counts, 0, sizeof(blk->counts));
    blk->sync_errno = 0;
    blk->python_next = 1;
    if (!avail || !used || !blk->buffers || !blk->size)
        return 0; /* Python's checks refuse such a queue */
    while (served < limit) {
        uint16_t avail_idx = __atomic_load_n((uint16_t *)(avail + 2), __ATOMIC_ACQUIRE);
        uint16_t pending = (uint16_t)(avail_idx - blk->next_avail);
        uint16_t head;
        uint32_t used_len, slot;

        if (pending > blk->size)
            break; /* an index Python reports as moved too far */
        if (!pending) {
            blk->python_next = 0;
            break;
        }
        memcpy(&head, avail + 4 + 2 * (blk->next_avail % blk->size), sizeof(head));
        if (!blk_serve_chain(blk, head, &used_len))
            break;
        blk->next_avail++;
        if (blk->event_idx) { /* avail_event: notify me when you make the next one available */
            __atomic_store_n((uint16_t *)(used + 4 + 8 * (uint64_t)blk->size), blk->next_avail, __ATOMIC_RELAXED);
            pykvm_note_written(blk->mem, blk->used_ring + 4 + 8 * (uint64_t)blk->size, 2);
            __atomic_thread_fence(__ATOMIC_SEQ_CST); /* before the next look at avail.idx (2.7.10) */
        }
        slot = blk->next_used % blk->size;
        memcpy(used + 4 + 8 * slot, &(uint32_t){ head }, 4);
        memcpy(used + 8 + 8 * slot, &used_len, 4);
        blk->next_used++;
        __atomic_store_n((uint16_t *)(used + 2), blk->next_used, __ATOMIC_RELEASE); /* after the element */
        pykvm_note_written(blk->mem, blk->used_ring + 4 + 8 * slot, 8);
        pykvm_note_written(blk->mem, blk->used_ring + 2, 2);
        served++;
    }
    return (int)served;
}

/* ---- guest memory to a sparse file ----------------------------------------------------
 *
 * pykvm_save_pages() writes the pages of [mem, mem + length) that hold anything but zeros
 * to fd, each at file_offset plus its offset, and leaves the all-zero ones as holes: a
 * snapshot's memory file costs what the guest used.  With pagemap_fd >= 0 (the process's
 * /proc/self/pagemap, for anonymous memory) a page that is neither present nor swapped
 * was never written and is skipped without being read.  Runs of pages go out in one
 * pwrite.  Returns the bytes written, or -errno.
 */
#define PYKVM_PAGE 4096u
#define PAGEMAP_PRESENT (1ull << 63)
#define PAGEMAP_SWAPPED (1ull << 62)
#define PAGEMAP_BATCH 512u

static int page_is_zero(const uint8_t *page)
{
    const uint64_t *words = (const uint64_t *)page;

    for (unsigned i = 0; i < PYKVM_PAGE / sizeof(uint64_t); i++)
        if (words[i])
            return 0;
    return 1;
}

static int64_t write_all(int fd, const uint8_t *data, uint64_t length, uint64_t offset)
{
    uint64_t done = 0;

    while (done < length) {
        ssize_t n = pwrite(fd, data + done, length - done, (off_t)(offset + done));

        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -EIO;
        done += (uint64_t)n;
    }
    return (int64_t)done;
}

/* Which of `count` pages from `mem` may hold data, from the pagemap (all of them without one). */
static int read_pagemap(int pagemap_fd, const uint8_t *mem, uint64_t count, uint64_t *entries)
{
    uint64_t want = count * sizeof(uint64_t), got = 0;

    if (pagemap_fd < 0) {
        for (uint64_t i = 0; i < count; i++)
            entries[i] = PAGEMAP_PRESENT;
        return 0;
    }
    while (got < want) {
        ssize_t n = pread(pagemap_fd, (uint8_t *)entries + got, want - got,
                          (off_t)((uintptr_t)mem / PYKVM_PAGE * sizeof(uint64_t) + got));

        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return n < 0 ? -errno : -EIO;
        got += (uint64_t)n;
    }
    return 0;
}

int64_t pykvm_save_pages(int fd, const uint8_t *mem, uint64_t length, uint64_t file_offset, int pagemap_fd)
{
    uint64_t entries[PAGEMAP_BATCH], pages = length / PYKVM_PAGE, run_start = 0, run_pages = 0;
    int64_t written = 0;

    if ((uintptr_t)mem % PYKVM_PAGE || length % PYKVM_PAGE)
        return -EINVAL;
    for (uint64_t first = 0; first < pages; first += PAGEMAP_BATCH) {
        uint64_t count = pages - first < PAGEMAP_BATCH ? pages - first : PAGEMAP_BATCH;
        int err = read_pagemap(pagemap_fd, mem + first * PYKVM_PAGE, count, entries);

        if (err)
            return err;
        for (uint64_t i = 0; i <= count; i++) {
            uint64_t page = first + i;
            int data = i < count && (entries[i] & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED))
                       && !page_is_zero(mem + page * PYKVM_PAGE);

            if (data) {
                if (!run_pages)
                    run_start = page;
                run_pages++;
                continue;
            }
            if (i == count && page < pages)
                break; /* the run may go on in the next batch */
            if (run_pages) {
                int64_t n = write_all(fd, mem + run_start * PYKVM_PAGE, run_pages * PYKVM_PAGE,
                                      file_offset + run_start * PYKVM_PAGE);

                if (n < 0)
                    return n;
                written += n;
                run_pages = 0;
            }
        }
    }
    return written;
}
