/* pykvm's C fast path: KVM_RUN and the exits that need no Python.
 *
 * pykvm_loop_run() calls KVM_RUN (cffi releases the GIL around it) and answers,
 * without returning to Python, the port-I/O and MMIO exits that a registered fast
 * handler covers: constant ports, debug-exit ports and serial transmit.  Any other
 * exit returns PYKVM_STOP_EXIT with kvm_run left as KVM filled it.
 *
 * Every function returns 0 (or a non-negative result) on success and -errno on
 * failure; none builds a Python object.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>

#define PYKVM_FAST_MAX 16
#define PYKVM_EXIT_REASONS 64

enum pykvm_fast_kind { PYKVM_FAST_CONSTANT, PYKVM_FAST_DEBUG_EXIT, PYKVM_FAST_SERIAL_TX };
enum pykvm_space { PYKVM_SPACE_PIO, PYKVM_SPACE_MMIO };
enum pykvm_stop { PYKVM_STOP_EXIT, PYKVM_STOP_DEBUG_EXIT, PYKVM_STOP_INTERRUPTED };

struct pykvm_fast_handler {
    uint32_t kind;
    uint32_t space;
    uint32_t enabled;
    uint64_t base;
    uint64_t length;
    uint64_t value;
    int fds[2];
    uint64_t reads;
    uint64_t writes;
};

/* Shared by every vCPU of a machine; counters are updated atomically. */
struct pykvm_fast_table {
    uint32_t count;
    struct pykvm_fast_handler handlers[PYKVM_FAST_MAX];
    int serial_errno;
};

struct pykvm_loop {
    int vcpu_fd;
    struct kvm_run *run;
    struct pykvm_fast_table *table;
    uint64_t exits[PYKVM_EXIT_REASONS];
    uint64_t fast_exits;
    uint64_t guest_ns;
    uint64_t fast_ns;
    uint64_t debug_exit_value;
};

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

/* Copy transmitted bytes to every output fd; a failing fd is dropped and its errno kept. */
static void serial_write(struct pykvm_fast_table *table, struct pykvm_fast_handler *h, const uint8_t *data, size_t len)
{
    for (int i = 0; i < 2; i++) {
        size_t done = 0;

        while (h->fds[i] >= 0 && done < len) {
            ssize_t n = write(h->fds[i], data + done, len - done);

            if (n >= 0) {
                done += (size_t)n;
            } else if (errno != EINTR) {
                table->serial_errno = errno;
                h->fds[i] = -1;
            }
        }
    }
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
        if (h->kind == PYKVM_FAST_SERIAL_TX)
            return -1;
        fill_constant(data, h->kind == PYKVM_FAST_CONSTANT ? h->value : 0, size, count);
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
        serial_write(loop->table, h, data, count);
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

int pykvm_loop_run(struct pykvm_loop *loop)
{
    for (;;) {
        uint64_t start = now_ns(), entered;
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
        handled = handle_fast(loop);
        if (handled < 0)
            return PYKVM_STOP_EXIT;
        loop->fast_exits++;
        loop->fast_ns += now_ns() - entered;
        if (handled == 0)
            return PYKVM_STOP_DEBUG_EXIT;
    }
}
