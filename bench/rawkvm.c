/* rawkvm.c - the raw-C floor that every pykvm benchmark figure is compared against.
 *
 * One small VMM written directly against <linux/kvm.h>, with the simplest possible run loop,
 * measuring:
 *   exits      ns per PIO or MMIO exit round trip (KVM_RUN -> exit -> KVM_RUN)
 *   ioeventfd  ns per guest write absorbed by a KVM ioeventfd (no userspace exit)
 *   lifecycle  ns to create a VM + memory (+ irqchip and PIT) + vCPU, set it up, run to the first
 *              exit, destroy it
 *   boot       one process: boot a multiboot kernel (an a.out-kludge flat image, such as
 *              guests/build/multiboot_kludge.bin) on pykvm's default machine, run it to its
 *              debug exit, exit with pykvm's status; the floor of `pykvm run` as a process
 *   compute    ns per iteration of an arithmetic loop run by the guest at CPL3
 *   native     ns per iteration of the same loop run on the host
 *   state      (no measurement) prints the vCPU entry state rawkvm sets, as JSON
 *   tsc        the time-stamp counter's ticks per second (guests that time themselves with
 *              rdtsc report ticks: the guest's TSC is the host's, see PLATFORM.md)
 *
 * The guests are the flat binaries built from guests/asm/bench_*.asm. Each starts with a
 * parameter block (offset 8: count, offset 16: target) that is patched before loading.
 *
 * Output: one JSON object per line on stdout; diagnostics on stderr. Any ioctl failure prints
 * the ioctl's name and strerror and exits 1; so does a benchmark whose result is wrong.
 *
 * C11 + Linux headers only. Build: make -C bench.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------
 * Guest machine layout (guest-physical addresses). pykvm uses the same values
 * (pykvm/x86/layout.py).
 * ------------------------------------------------------------------------------------------ */
#define GUEST_RAM_SIZE   (64ull << 20)   /* one slot at GPA 0 */
#define GDT_ADDR         0x500ull        /* 8 slots, 0x00..0x38: the 16-byte TSS descriptor takes 0x30 and 0x38 */
#define GDT_LIMIT        (8 * 8 - 1)
#define TSS_ADDR         0x580ull        /* 64-bit TSS (104 bytes) + I/O bitmap, ends at 0xde8 */
#define TSS_IOMAP_OFF    0x68            /* I/O permission bitmap right after the TSS proper */
#define TSS_IOMAP_PORTS  0x4000          /* ports 0..0x3fff allowed; higher ports lie beyond the limit */
#define TSS_LIMIT        (TSS_IOMAP_OFF + TSS_IOMAP_PORTS / 8)   /* 0x868: includes the 0xff end byte */
#define PML4_ADDR        0x1000ull
#define PDPT_ADDR        0x2000ull
#define PD_ADDR          0x3000ull       /* four PDs, 0x3000-0x6fff: 4 GiB of 2 MiB pages */
#define PD_COUNT         4
#define STACK_TOP        0x8ff0ull       /* initial RSP (CPL0 and CPL3), also TSS.RSP0 */
#define GUEST_LOAD_ADDR  0x100000ull     /* flat guest binary loads and starts here */
#define IDENTITY_MAP_END (4ull << 30)

/* GDT selectors */
#define SEL_CODE64       0x08
#define SEL_CODE32       0x10
#define SEL_DATA         0x18
#define SEL_USER_DATA    0x23            /* entry 0x20, RPL 3 */
#define SEL_USER_CODE64  0x2b            /* entry 0x28, RPL 3 */
#define SEL_TSS          0x30

/* Control registers at entry */
#define CR0_PE  (1u << 0)
#define CR0_MP  (1u << 1)
#define CR0_ET  (1u << 4)
#define CR0_NE  (1u << 5)
#define CR0_WP  (1u << 16)
#define CR0_PG  (1u << 31)
#define CR4_PAE (1u << 5)
#define CR4_OSFXSR (1u << 9)
#define CR4_OSXMMEXCPT (1u << 10)
#define EFER_LME (1u << 8)
#define EFER_LMA (1u << 10)
#define ENTRY_CR0  (CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG)   /* 0x80010033 */
#define ENTRY_CR4  (CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT)               /* 0x620 */
#define ENTRY_EFER (EFER_LME | EFER_LMA)                                  /* 0x500 */
#define RFLAGS_FIXED 0x2ull
#define RFLAGS_IOPL3 0x3000ull

/* Page-table entry bits: present, writable, user (so CPL3 code can use the same tables) */
#define PTE_P  1ull
#define PTE_RW 2ull
#define PTE_US 4ull
#define PTE_PS 0x80ull

/* Bench guest parameter block */
#define PARAM_COUNT_OFF  8
#define PARAM_TARGET_OFF 16
#define PARAM_BLOCK_SIZE 24
#define DEBUG_EXIT_PORT  0xf4

#define DEFAULT_PIO_PORT  0x80
#define DEFAULT_MMIO_ADDR 0xd0000000ull

/* The host copy of bench_compute.asm's loop: same instructions, same registers, same order.
 * rax/rbx/rdx are the state, rcx the counter. */
#define COMPUTE_SEED_RAX 0x0123456789abcdefull
#define COMPUTE_SEED_RBX 0x0fedcba987654321ull
#define COMPUTE_SEED_RDX 0x9e3779b97f4a7c15ull
#define COMPUTE_LOOP_ASM      \
    ".intel_syntax noprefix\n" \
    "    test rcx, rcx\n"      \
    "    jz 2f\n"              \
    "    .p2align 4\n"         \
    "1:\n"                     \
    "    add rax, rbx\n"       \
    "    xor rdx, rax\n"       \
    "    rol rdx, 13\n"        \
    "    add rbx, rdx\n"       \
    "    xor rax, rcx\n"       \
    "    ror rbx, 7\n"         \
    "    dec rcx\n"            \
    "    jnz 1b\n"             \
    "2:\n"                     \
    "    xor rax, rbx\n"       \
    "    xor rax, rdx\n"       \
    ".att_syntax prefix\n"

/* ------------------------------------------------------------------------------------------
 * Errors: every failure names what failed, goes to stderr, and is also reported as one JSON
 * line with "ok": false on stdout so a harness reading stdout sees it.
 * ------------------------------------------------------------------------------------------ */
static const char *g_bench = "rawkvm";

static void json_string(FILE *f, const char *s) {
    fputc('"', f);
    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c == '"' || c == '\\') fprintf(f, "\\%c", c);
        else if (c < 0x20) fprintf(f, "\\u%04x", c);
        else fputc(c, f);
    }
    fputc('"', f);
}

__attribute__((noreturn, format(printf, 1, 2)))
static void die(const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "rawkvm %s: %s\n", g_bench, msg);
    printf("{\"bench\": ");
    json_string(stdout, g_bench);
    printf(", \"ok\": false, \"error\": ");
    json_string(stdout, msg);
    printf("}\n");
    fflush(stdout);
    exit(1);
}

static long xioctl(int fd, unsigned long req, unsigned long arg, const char *name) {
    long r = ioctl(fd, req, arg);
    if (r < 0) die("%s: %s", name, strerror(errno));
    return r;
}
#define IOCTL(fd, req, arg) xioctl((fd), (req), (unsigned long)(arg), #req)

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

/* ------------------------------------------------------------------------------------------
 * Watchdog: a guest that never reaches its exit must not hang the benchmark. SIGALRM kicks
 * the vCPU out of KVM_RUN (EINTR) and sets immediate_exit so it cannot re-enter.
 * ------------------------------------------------------------------------------------------ */
static struct kvm_run *volatile g_watch_run;
static volatile sig_atomic_t g_timed_out;
static int g_timeout_s = 120;

static void on_alarm(int sig) {
    (void)sig;
    g_timed_out = 1;
    if (g_watch_run) g_watch_run->immediate_exit = 1;
}

static void watchdog_install(void) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm;          /* no SA_RESTART: KVM_RUN must return EINTR */
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGALRM, &sa, NULL) < 0) die("sigaction(SIGALRM): %s", strerror(errno));
}

static void watchdog_arm(struct kvm_run *run) {
    struct itimerval it;
    memset(&it, 0, sizeof it);
    it.it_value.tv_sec = g_timeout_s;
    g_watch_run = run;
    g_timed_out = 0;
    if (setitimer(ITIMER_REAL, &it, NULL) < 0) die("setitimer: %s", strerror(errno));
}

static void watchdog_disarm(void) {
    struct itimerval it;
    memset(&it, 0, sizeof it);
    setitimer(ITIMER_REAL, &it, NULL);
    g_watch_run = NULL;
}

/* KVM_RUN; returns the exit reason. A stray signal is retried; the watchdog is fatal. */
static inline unsigned kvm_run(int vcpu_fd, struct kvm_run *run) {
    while (ioctl(vcpu_fd, KVM_RUN, 0) < 0) {
        if (errno != EINTR) die("KVM_RUN: %s", strerror(errno));
        if (g_timed_out)
            die("KVM_RUN: guest did not finish within %d s (watchdog; raise --timeout?)", g_timeout_s);
    }
    return run->exit_reason;
}

/* ------------------------------------------------------------------------------------------
 * /dev/kvm, VM, vCPU
 * ------------------------------------------------------------------------------------------ */
static int g_kvm = -1;
static size_t g_run_size;
static struct kvm_cpuid2 *g_cpuid;     /* KVM_GET_SUPPORTED_CPUID, fetched once per process */

static void kvm_open(void) {
    g_kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (g_kvm < 0) die("open /dev/kvm: %s (is KVM available, and are you root or in group kvm?)", strerror(errno));
    long api = IOCTL(g_kvm, KVM_GET_API_VERSION, 0);
    if (api != KVM_API_VERSION) die("KVM_GET_API_VERSION: %ld, expected %d", api, KVM_API_VERSION);
    g_run_size = (size_t)IOCTL(g_kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    for (unsigned n = 64;; n *= 2) {
        struct kvm_cpuid2 *c = calloc(1, sizeof *c + n * sizeof(struct kvm_cpuid_entry2));
        if (!c) die("out of memory");
        c->nent = n;
        if (ioctl(g_kvm, KVM_GET_SUPPORTED_CPUID, c) == 0) { g_cpuid = c; break; }
        free(c);
        if (errno != E2BIG || n >= 4096) die("KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
    }
    watchdog_install();
}

typedef struct {
    int vm_fd, vcpu_fd;
    struct kvm_run *run;
    uint8_t *mem;           /* host view of guest RAM (GPA 0..GUEST_RAM_SIZE) */
} vm_t;

typedef struct { uint8_t *bytes; size_t len; } image_t;

/* The phases of bringing a VM up; lifecycle times each one. */
static void vm_create(vm_t *v) {
    v->vm_fd = (int)IOCTL(g_kvm, KVM_CREATE_VM, 0);
}

static void vm_add_memory(vm_t *v) {
    v->mem = mmap(NULL, GUEST_RAM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (v->mem == MAP_FAILED) die("mmap guest RAM (%llu MiB): %s", GUEST_RAM_SIZE >> 20, strerror(errno));
    struct kvm_userspace_memory_region r = {
        .slot = 0, .flags = 0, .guest_phys_addr = 0, .memory_size = GUEST_RAM_SIZE,
        .userspace_addr = (uint64_t)(uintptr_t)v->mem,
    };
    IOCTL(v->vm_fd, KVM_SET_USER_MEMORY_REGION, &r);
}

/* The in-kernel PIC, IOAPIC and PIT of pykvm's default machine, wired as pykvm wires them
 * (pykvm/x86/interrupts.py, QEMU's PC routing): ISA IRQs to both 8259s and the IOAPIC, the
 * PIT (IRQ 0) on IOAPIC pin 2, GSIs 16-23 to the IOAPIC.  After the memory slot: a slot
 * registered after KVM_CREATE_IRQCHIP waits for an SRCU grace period. */
#define ISA_IRQS     16
#define IOAPIC_PINS  24
#define PIC_CASCADE  2
#define PIT_IOAPIC_PIN 2
static void vm_add_irqchip(vm_t *v) {
    IOCTL(v->vm_fd, KVM_CREATE_IRQCHIP, 0);
    size_t max = ISA_IRQS + IOAPIC_PINS;
    struct kvm_irq_routing *r = calloc(1, sizeof *r + max * sizeof(struct kvm_irq_routing_entry));
    if (!r) die("out of memory");
    for (unsigned irq = 0; irq < ISA_IRQS; irq++) {
        if (irq == PIC_CASCADE) continue;
        struct kvm_irq_routing_entry *e = &r->entries[r->nr++];
        e->gsi = irq;
        e->type = KVM_IRQ_ROUTING_IRQCHIP;
        e->u.irqchip.irqchip = irq < 8 ? KVM_IRQCHIP_PIC_MASTER : KVM_IRQCHIP_PIC_SLAVE;
        e->u.irqchip.pin = irq % 8;
    }
    for (unsigned gsi = 0; gsi < IOAPIC_PINS; gsi++) {
        if (gsi == PIC_CASCADE) continue;
        struct kvm_irq_routing_entry *e = &r->entries[r->nr++];
        e->gsi = gsi;
        e->type = KVM_IRQ_ROUTING_IRQCHIP;
        e->u.irqchip.irqchip = KVM_IRQCHIP_IOAPIC;
        e->u.irqchip.pin = gsi == 0 ? PIT_IOAPIC_PIN : gsi;
    }
    IOCTL(v->vm_fd, KVM_SET_GSI_ROUTING, r);
    free(r);
    struct kvm_pit_config pit = { .flags = KVM_PIT_SPEAKER_DUMMY };
    IOCTL(v->vm_fd, KVM_CREATE_PIT2, &pit);
}

static void vm_create_vcpu(vm_t *v) {
    v->vcpu_fd = (int)IOCTL(v->vm_fd, KVM_CREATE_VCPU, 0);
    v->run = mmap(NULL, g_run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu_fd, 0);
    if (v->run == MAP_FAILED) die("mmap kvm_run: %s", strerror(errno));
}

static void vm_destroy(vm_t *v) {
    munmap(v->run, g_run_size);
    close(v->vcpu_fd);
    close(v->vm_fd);
    munmap(v->mem, GUEST_RAM_SIZE);
}

/* GDT, TSS and identity page tables in guest memory. */
static void write_boot_tables(uint8_t *mem) {
    uint64_t *gdt = (uint64_t *)(mem + GDT_ADDR);
    gdt[0] = 0;                                     /* 0x00 null */
    gdt[1] = 0x00af9b000000ffffull;                 /* 0x08 code64, DPL0 (L=1) */
    gdt[2] = 0x00cf9b000000ffffull;                 /* 0x10 code32, DPL0 (D=1) */
    gdt[3] = 0x00cf93000000ffffull;                 /* 0x18 data, DPL0 */
    gdt[4] = 0x00cff3000000ffffull;                 /* 0x20 user data, DPL3 (selector 0x23) */
    gdt[5] = 0x00affb000000ffffull;                 /* 0x28 user code64, DPL3 (selector 0x2b) */
    gdt[6] = ((uint64_t)TSS_LIMIT & 0xffff)         /* 0x30 64-bit TSS (busy), base TSS_ADDR */
           | ((TSS_ADDR & 0xffffff) << 16)
           | (0x8bull << 40)
           | (((TSS_ADDR >> 24) & 0xff) << 56);
    uint64_t *gdt_hi = (uint64_t *)(mem + GDT_ADDR + 7 * 8);
    gdt_hi[0] = TSS_ADDR >> 32;                     /* upper half of the TSS descriptor */

    /* The TSS. RFLAGS.IOPL=3 already lets CPL3 code use every port on hardware; the I/O bitmap is
     * for KVM backends that do not show IOPL to CPL3 code: kvm_pvm runs CPL3 with IOPL=0 whatever
     * KVM_SET_REGS said, so an OUT there is allowed only if the bitmap allows the port. */
    uint8_t *tss = mem + TSS_ADDR;
    memset(tss, 0, TSS_LIMIT + 1);                  /* zero bits: every port below TSS_IOMAP_PORTS allowed */
    *(uint64_t *)(tss + 4) = STACK_TOP;             /* RSP0 */
    *(uint16_t *)(tss + 0x66) = TSS_IOMAP_OFF;      /* I/O map base */
    tss[TSS_LIMIT] = 0xff;                          /* the bitmap's required all-ones end byte */

    uint64_t *pml4 = (uint64_t *)(mem + PML4_ADDR), *pdpt = (uint64_t *)(mem + PDPT_ADDR);
    memset(pml4, 0, 4096);
    memset(pdpt, 0, 4096);
    pml4[0] = PDPT_ADDR | PTE_P | PTE_RW | PTE_US;
    for (uint64_t i = 0; i < PD_COUNT; i++) {
        uint64_t *pd = (uint64_t *)(mem + PD_ADDR + i * 4096);
        pdpt[i] = (PD_ADDR + i * 4096) | PTE_P | PTE_RW | PTE_US;
        for (uint64_t j = 0; j < 512; j++)
            pd[j] = ((i * 512 + j) << 21) | PTE_P | PTE_RW | PTE_US | PTE_PS;
    }
}

static struct kvm_segment seg(uint16_t sel, uint8_t type, uint8_t dpl, uint8_t l, uint8_t db) {
    struct kvm_segment s = {
        .base = 0, .limit = 0xffffffff, .selector = sel, .type = type, .present = 1,
        .dpl = dpl, .db = db, .s = 1, .l = l, .g = 1, .avl = 0, .unusable = 0,
    };
    return s;
}

/* CPUID, sregs (long mode, identity paging, GDT/TSS above) and regs for entry at GUEST_LOAD_ADDR. */
static void vcpu_setup(vm_t *v, int cpl) {
    IOCTL(v->vcpu_fd, KVM_SET_CPUID2, g_cpuid);

    struct kvm_sregs s;
    IOCTL(v->vcpu_fd, KVM_GET_SREGS, &s);           /* start from KVM's reset state (ldt, apic_base) */
    if (cpl == 3) {
        s.cs = seg(SEL_USER_CODE64, 11, 3, 1, 0);
        s.ds = seg(SEL_USER_DATA, 3, 3, 0, 1);
    } else {
        s.cs = seg(SEL_CODE64, 11, 0, 1, 0);
        s.ds = seg(SEL_DATA, 3, 0, 0, 1);
    }
    s.es = s.fs = s.gs = s.ss = s.ds;
    s.tr = (struct kvm_segment){ .base = TSS_ADDR, .limit = TSS_LIMIT, .selector = SEL_TSS, .type = 11,
                                 .present = 1, .dpl = 0, .db = 0, .s = 0, .l = 0, .g = 0 };
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = GDT_LIMIT;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = ENTRY_CR0;
    s.cr3 = PML4_ADDR;
    s.cr4 = ENTRY_CR4;
    s.efer = ENTRY_EFER;
    IOCTL(v->vcpu_fd, KVM_SET_SREGS, &s);
}

static void vcpu_set_entry_regs(vm_t *v, int cpl) {
    struct kvm_regs r;
    memset(&r, 0, sizeof r);
    r.rip = GUEST_LOAD_ADDR;
    r.rsp = STACK_TOP;
    r.rflags = RFLAGS_FIXED | (cpl == 3 ? RFLAGS_IOPL3 : 0);
    IOCTL(v->vcpu_fd, KVM_SET_REGS, &r);
}

static void load_guest(vm_t *v, const image_t *img) {
    write_boot_tables(v->mem);
    memcpy(v->mem + GUEST_LOAD_ADDR, img->bytes, img->len);
}

/* A whole VM ready to run the guest from its entry point. */
static void vm_boot(vm_t *v, const image_t *img, int cpl) {
    vm_create(v);
    vm_add_memory(v);
    vm_create_vcpu(v);
    vcpu_setup(v, cpl);
    vcpu_set_entry_regs(v, cpl);
    load_guest(v, img);
}

/* Read a bench guest and patch its parameter block. */
static image_t image_load(const char *path, uint64_t count, uint64_t target) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        int e = errno;
        die("cannot open guest %s: %s%s", path, strerror(e), e == ENOENT ? " (build it with make -C bench)" : "");
    }
    size_t cap = GUEST_RAM_SIZE - GUEST_LOAD_ADDR;
    image_t img = { malloc(cap), 0 };
    if (!img.bytes) die("out of memory");
    img.len = fread(img.bytes, 1, cap, f);
    int more = fgetc(f) != EOF;
    fclose(f);
    if (more) die("guest %s is larger than the %zu bytes of RAM above 0x%llx", path, cap, GUEST_LOAD_ADDR);
    if (img.len < PARAM_BLOCK_SIZE || img.bytes[0] != 0xeb)
        die("guest %s has no bench parameter block (expected `jmp short` at offset 0 and %d bytes)",
            path, PARAM_BLOCK_SIZE);
    memcpy(img.bytes + PARAM_COUNT_OFF, &count, 8);
    memcpy(img.bytes + PARAM_TARGET_OFF, &target, 8);
    return img;
}

/* ------------------------------------------------------------------------------------------
 * Statistics and output
 * ------------------------------------------------------------------------------------------ */
static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

typedef struct { double median, min, max; } stats_t;

static stats_t stats(const double *v, int n) {
    double *s = malloc(sizeof(double) * (size_t)n);
    if (!s) die("out of memory");
    memcpy(s, v, sizeof(double) * (size_t)n);
    qsort(s, (size_t)n, sizeof *s, cmp_double);
    stats_t r = { n % 2 ? s[n / 2] : (s[n / 2 - 1] + s[n / 2]) / 2, s[0], s[n - 1] };
    free(s);
    return r;
}

/* The fields every result line starts with. per_unit: n samples of ns per unit; total_ns: the
 * median wall time of one measured run (lifecycle: of all N lifecycles together). */
static void print_head(const char *unit, uint64_t count, int repeat, const double *per_unit, int n,
                       double total_ns, int with_samples) {
    stats_t p = stats(per_unit, n);
    printf("{\"bench\": \"%s\", \"ok\": true, \"unit\": \"%s\", \"count\": %llu, \"repeat\": %d, "
           "\"median_ns\": %.3f, \"min_ns\": %.3f, \"max_ns\": %.3f, \"total_ns\": %.0f",
           g_bench, unit, (unsigned long long)count, repeat, p.median, p.min, p.max, total_ns);
    if (with_samples) {
        printf(", \"samples_ns\": [");
        for (int i = 0; i < n; i++) printf("%s%.3f", i ? ", " : "", per_unit[i]);
        printf("]");
    }
}

/* ------------------------------------------------------------------------------------------
 * Options
 * ------------------------------------------------------------------------------------------ */
typedef struct {
    const char *guest, *kind;
    uint64_t count, target;
    const char *serial;
    int has_count, has_target, repeat, cpl, irqchip, has_irqchip;
} opts_t;

static const char *USAGE =
    "usage: rawkvm SUBCOMMAND [options]\n"
    "\n"
    "The raw-C KVM baseline for pykvm's benchmarks. Each subcommand prints one JSON line.\n"
    "Figures are per unit (exit, notification, lifecycle, iteration): median, min and max of\n"
    "--repeat runs, in ns, after one unmeasured warm-up run.\n"
    "\n"
    "subcommands:\n"
    "  exits      --guest PATH --kind pio|mmio [--count N] [--target X] [--cpl 0|3]\n"
    "             N PIO (out dx,al) or MMIO (4-byte store) exits, each handled by the simplest\n"
    "             C loop; ns per exit. Defaults: N=20000, target 0x80 (pio) / 0xd0000000 (mmio), cpl 0.\n"
    "  ioeventfd  --guest PATH [--kind pio|mmio] [--count N] [--target X] [--cpl 0|3]\n"
    "             the same guest with the target registered as an ioeventfd (no userspace exit);\n"
    "             ns per notification; checks the eventfd counter equals N. Default N=20000.\n"
    "  lifecycle  --guest PATH [--count N] [--target X] [--irqchip 0|1]\n"
    "             N x (KVM_CREATE_VM, mmap + memory slot, [irqchip], vCPU + kvm_run, CPUID/sregs/regs,\n"
    "             load guest, KVM_RUN to the first PIO exit, close all); median ns per lifecycle\n"
    "             over the N lifecycles, and per phase. Use bench_pio.bin. Default N=200.\n"
    "             --irqchip 1: after the slot, KVM_CREATE_IRQCHIP, pykvm's GSI routing and\n"
    "             KVM_CREATE_PIT2, as pykvm's default machine.\n"
    "  boot       --guest KERNEL [--irqchip 0|1] [--serial none|stdio]\n"
    "             boot a multiboot a.out-kludge image (multiboot_kludge.bin) in 32-bit protected\n"
    "             mode on pykvm's default machine (--irqchip 1, the default), with a COM1 that\n"
    "             transmits at once, to its debug exit; exits with (value << 1) | 1, as pykvm.\n"
    "             Prints its JSON line on stderr (stdout is the serial port with --serial stdio).\n"
    "  compute    --guest PATH [--count N] [--cpl 3|0]\n"
    "             bench_compute at CPL3 for N iterations; ns per iteration and result byte.\n"
    "             Default N=100000000.\n"
    "  native     [--count N]\n"
    "             the same loop (same instructions) on the host; ns per iteration. Default N=100000000.\n"
    "  tsc        [--count MS]\n"
    "             TSC ticks per second, measured against CLOCK_MONOTONIC_RAW over MS ms (default 200).\n"
    "  state      [--cpl 0|3]\n"
    "             print the vCPU entry state (regs, sregs) rawkvm sets, as JSON; no guest is run.\n"
    "\n"
    "common options:\n"
    "  --repeat R     measured runs (default 5; lifecycle: ignored, N samples)\n"
    "  --timeout S    watchdog per guest run, seconds (default 120)\n"
    "  --guest PATH   default: guests/build/bench_<kind|compute>.bin next to this program's tree\n"
    "\n"
    "Exit status: 0 ok; 1 an ioctl failed, the guest misbehaved or a result was wrong; 2 bad usage.\n";

__attribute__((noreturn, format(printf, 1, 2)))
static void usage_error(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "rawkvm: ");
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, "\nTry 'rawkvm --help'.\n");
    exit(2);
}

static uint64_t parse_u64(const char *opt, const char *s) {
    char *end;
    errno = 0;
    if (!s || !*s || *s == '-') usage_error("%s needs a non-negative number", opt);
    unsigned long long v = strtoull(s, &end, 0);
    if (errno || *end) usage_error("%s: not a number: %s", opt, s);
    return v;
}

static opts_t parse_opts(int argc, char **argv) {
    opts_t o = { .repeat = 5, .cpl = -1 };
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *val = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--help") || !strcmp(a, "-h")) { fputs(USAGE, stdout); exit(0); }
        if (!val) usage_error("%s needs a value", a);
        if (!strcmp(a, "--guest")) o.guest = val;
        else if (!strcmp(a, "--kind")) o.kind = val;
        else if (!strcmp(a, "--count")) { o.count = parse_u64(a, val); o.has_count = 1; }
        else if (!strcmp(a, "--target")) { o.target = parse_u64(a, val); o.has_target = 1; }
        else if (!strcmp(a, "--repeat")) {
            uint64_t r = parse_u64(a, val);
            if (r < 1 || r > 1000) usage_error("--repeat must be 1..1000");
            o.repeat = (int)r;
        } else if (!strcmp(a, "--cpl")) {
            uint64_t c = parse_u64(a, val);
            if (c != 0 && c != 3) usage_error("--cpl must be 0 or 3");
            o.cpl = (int)c;
        } else if (!strcmp(a, "--irqchip")) {
            uint64_t c = parse_u64(a, val);
            if (c > 1) usage_error("--irqchip must be 0 or 1");
            o.irqchip = (int)c;
            o.has_irqchip = 1;
        } else if (!strcmp(a, "--serial")) {
            o.serial = val;
        } else if (!strcmp(a, "--timeout")) {
            uint64_t t = parse_u64(a, val);
            if (t < 1 || t > 86400) usage_error("--timeout must be 1..86400 seconds");
            g_timeout_s = (int)t;
        } else usage_error("unknown option %s", a);
        i++;
    }
    return o;
}

/* Default guest: <dir of this executable>/../../guests/build/<name> (bench/build/rawkvm). */
static const char *default_guest(const char *name) {
    static char path[PATH_MAX + 64];
    char exe[PATH_MAX];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof exe - 1);
    if (n <= 0) usage_error("--guest is required");
    exe[n] = 0;
    char *slash = strrchr(exe, '/');
    if (slash) *slash = 0;
    snprintf(path, sizeof path, "%s/../../guests/build/%s", exe, name);
    return path;
}

static int parse_kind(const opts_t *o) {   /* 0 = pio, 1 = mmio */
    if (!o->kind || !strcmp(o->kind, "pio")) return 0;
    if (!strcmp(o->kind, "mmio")) return 1;
    usage_error("--kind must be pio or mmio, not %s", o->kind);
}

static uint64_t check_target(int mmio, const opts_t *o) {
    if (!o->has_target) return mmio ? DEFAULT_MMIO_ADDR : DEFAULT_PIO_PORT;
    if (mmio) {
        if (o->target < GUEST_RAM_SIZE || o->target + 4 > IDENTITY_MAP_END || o->target % 4)
            usage_error("--target for mmio must be 4-byte aligned, above guest RAM (0x%llx) and below 4 GiB",
                        GUEST_RAM_SIZE);
    } else if (o->target > 0xffff || o->target == DEBUG_EXIT_PORT) {
        usage_error("--target for pio must be a port 0..0xffff other than 0x%x", DEBUG_EXIT_PORT);
    } else if (o->cpl == 3 && o->target >= TSS_IOMAP_PORTS) {
        usage_error("--target for pio at CPL3 must be below 0x%x (the TSS I/O bitmap's range)", TSS_IOMAP_PORTS);
    }
    return o->target;
}

static void describe_exit(const struct kvm_run *run, unsigned reason, char *buf, size_t n) {
    if (reason == KVM_EXIT_IO)
        snprintf(buf, n, "KVM_EXIT_IO %s port=0x%x size=%u count=%u", run->io.direction ? "out" : "in",
                 run->io.port, run->io.size, run->io.count);
    else if (reason == KVM_EXIT_MMIO)
        snprintf(buf, n, "KVM_EXIT_MMIO %s addr=0x%llx len=%u", run->mmio.is_write ? "write" : "read",
                 (unsigned long long)run->mmio.phys_addr, run->mmio.len);
    else if (reason == KVM_EXIT_INTERNAL_ERROR)
        snprintf(buf, n, "KVM_EXIT_INTERNAL_ERROR suberror=%u", run->internal.suberror);
    else if (reason == KVM_EXIT_SHUTDOWN)
        snprintf(buf, n, "KVM_EXIT_SHUTDOWN (triple fault)");
    else
        snprintf(buf, n, "exit reason %u", reason);
}

__attribute__((noreturn))
static void unexpected_exit(const struct kvm_run *run, unsigned reason, const char *when) {
    char d[160];
    describe_exit(run, reason, d, sizeof d);
    die("unexpected %s %s", d, when);
}

static uint8_t io_byte(const struct kvm_run *run) {
    return *((const uint8_t *)run + run->io.data_offset);
}

static int is_debug_exit(const struct kvm_run *run, unsigned reason) {
    return reason == KVM_EXIT_IO && run->io.port == DEBUG_EXIT_PORT && run->io.direction == KVM_EXIT_IO_OUT;
}

/* ------------------------------------------------------------------------------------------
 * exits: the floor for one exit round trip.
 * ------------------------------------------------------------------------------------------ */

/* One run of the guest from its entry point; returns wall ns, stores the number of bench exits. */
static uint64_t run_exit_loop(vm_t *v, int cpl, int mmio, uint64_t target, uint64_t *exits_out) {
    struct kvm_run *run = v->run;
    uint64_t exits = 0;
    unsigned reason;
    vcpu_set_entry_regs(v, cpl);
    watchdog_arm(run);
    uint64_t t0 = now_ns();
    for (;;) {
        reason = kvm_run(v->vcpu_fd, run);
        if (reason == KVM_EXIT_IO) {
            if (run->io.port == target && !mmio) { exits++; continue; }
            break;
        }
        if (reason == KVM_EXIT_MMIO && run->mmio.phys_addr == target && mmio) { exits++; continue; }
        break;
    }
    uint64_t t1 = now_ns();
    watchdog_disarm();
    if (!is_debug_exit(run, reason)) unexpected_exit(run, reason, "(expected the bench target or port 0xf4)");
    if (io_byte(run) != 0) die("guest exited with code %u, expected 0", io_byte(run));
    *exits_out = exits;
    return t1 - t0;
}

/* Everything about the bench exits except their count is checked once, outside the timed loop. */
static void check_one_exit(vm_t *v, int cpl, int mmio, uint64_t target) {
    struct kvm_run *run = v->run;
    vcpu_set_entry_regs(v, cpl);
    watchdog_arm(run);
    unsigned reason = kvm_run(v->vcpu_fd, run);
    watchdog_disarm();
    int ok = mmio ? reason == KVM_EXIT_MMIO && run->mmio.phys_addr == target && run->mmio.len == 4 && run->mmio.is_write
                  : reason == KVM_EXIT_IO && run->io.port == target && run->io.size == 1 && run->io.count == 1 &&
                    run->io.direction == KVM_EXIT_IO_OUT;
    if (!ok) unexpected_exit(run, reason, mmio ? "(expected a 4-byte MMIO write to the target)"
                                                : "(expected a 1-byte OUT to the target port)");
}

static int cmd_exits(int argc, char **argv) {
    g_bench = "exits";
    opts_t o = parse_opts(argc, argv);
    if (!o.kind) usage_error("exits needs --kind pio|mmio");
    int mmio = parse_kind(&o), cpl = o.cpl < 0 ? 0 : o.cpl;
    uint64_t n = o.has_count ? o.count : 20000, target = check_target(mmio, &o);
    if (n < 1) usage_error("--count must be at least 1");
    const char *path = o.guest ? o.guest : default_guest(mmio ? "bench_mmio.bin" : "bench_pio.bin");
    kvm_open();
    image_t img = image_load(path, n, target);
    vm_t v;
    vm_boot(&v, &img, cpl);
    check_one_exit(&v, cpl, mmio, target);

    double *per = calloc((size_t)o.repeat, sizeof *per), *tot = calloc((size_t)o.repeat, sizeof *tot);
    uint64_t exits;
    run_exit_loop(&v, cpl, mmio, target, &exits);                      /* warm-up */
    for (int k = 0; k < o.repeat; k++) {
        uint64_t ns = run_exit_loop(&v, cpl, mmio, target, &exits);
        if (exits != n) die("counted %llu exits, expected %llu", (unsigned long long)exits, (unsigned long long)n);
        tot[k] = (double)ns;
        per[k] = (double)ns / (double)exits;
    }
    print_head("exit", n, o.repeat, per, o.repeat, stats(tot, o.repeat).median, 1);
    printf(", \"kind\": \"%s\", \"cpl\": %d, \"target\": %llu, \"exits\": %llu, \"guest\": ",
           mmio ? "mmio" : "pio", cpl, (unsigned long long)target, (unsigned long long)exits);
    json_string(stdout, path);
    printf("}\n");
    vm_destroy(&v);
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * ioeventfd: the same guest, the target absorbed in the kernel.
 * ------------------------------------------------------------------------------------------ */
static uint64_t run_ioeventfd(vm_t *v, int cpl, int efd, uint64_t *count_out) {
    struct kvm_run *run = v->run;
    vcpu_set_entry_regs(v, cpl);
    watchdog_arm(run);
    uint64_t t0 = now_ns();
    unsigned reason = kvm_run(v->vcpu_fd, run);
    uint64_t t1 = now_ns();
    watchdog_disarm();
    if (!is_debug_exit(run, reason))
        unexpected_exit(run, reason, "(every bench write should go to the ioeventfd; expected only port 0xf4)");
    if (io_byte(run) != 0) die("guest exited with code %u, expected 0", io_byte(run));
    uint64_t c = 0;
    if (read(efd, &c, sizeof c) != (ssize_t)sizeof c) {
        if (errno != EAGAIN) die("read eventfd: %s", strerror(errno));
        c = 0;                                     /* counter was 0 */
    }
    *count_out = c;
    return t1 - t0;
}

static int cmd_ioeventfd(int argc, char **argv) {
    g_bench = "ioeventfd";
    opts_t o = parse_opts(argc, argv);
    int mmio = parse_kind(&o), cpl = o.cpl < 0 ? 0 : o.cpl;
    uint64_t n = o.has_count ? o.count : 20000, target = check_target(mmio, &o);
    if (n < 1) usage_error("--count must be at least 1");
    const char *path = o.guest ? o.guest : default_guest(mmio ? "bench_mmio.bin" : "bench_pio.bin");
    kvm_open();
    image_t img = image_load(path, n, target);
    vm_t v;
    vm_boot(&v, &img, cpl);

    int efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
    if (efd < 0) die("eventfd: %s", strerror(errno));
    struct kvm_ioeventfd ioev = {
        .datamatch = 0, .addr = target, .len = mmio ? 4 : 1, .fd = efd,
        .flags = mmio ? 0 : KVM_IOEVENTFD_FLAG_PIO,
    };
    IOCTL(v.vm_fd, KVM_IOEVENTFD, &ioev);

    double *per = calloc((size_t)o.repeat, sizeof *per), *tot = calloc((size_t)o.repeat, sizeof *tot);
    uint64_t c;
    run_ioeventfd(&v, cpl, efd, &c);                                   /* warm-up */
    if (c != n) die("eventfd counter %llu after the warm-up run, expected %llu", (unsigned long long)c, (unsigned long long)n);
    for (int k = 0; k < o.repeat; k++) {
        uint64_t ns = run_ioeventfd(&v, cpl, efd, &c);
        if (c != n) die("eventfd counter %llu, expected %llu", (unsigned long long)c, (unsigned long long)n);
        tot[k] = (double)ns;
        per[k] = (double)ns / (double)n;
    }
    print_head("notification", n, o.repeat, per, o.repeat, stats(tot, o.repeat).median, 1);
    printf(", \"kind\": \"%s\", \"cpl\": %d, \"target\": %llu, \"eventfd_count\": %llu, \"guest\": ",
           mmio ? "mmio" : "pio", cpl, (unsigned long long)target, (unsigned long long)c);
    json_string(stdout, path);
    printf("}\n");
    close(efd);
    vm_destroy(&v);
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * lifecycle: create -> first exit -> destroy, timed per phase.
 * ------------------------------------------------------------------------------------------ */
enum { PH_CREATE_VM, PH_MEMORY, PH_IRQCHIP, PH_VCPU, PH_SETUP, PH_FIRST_RUN, PH_TEARDOWN, PH_COUNT };
static const char *const PHASE_NAMES[PH_COUNT] = {
    "create_vm", "memory", "irqchip", "create_vcpu", "setup", "first_run", "teardown",
};

static uint64_t one_lifecycle(const image_t *img, uint64_t port, int irqchip, uint64_t ph[PH_COUNT]) {
    vm_t v;
    uint64_t t[PH_COUNT + 1];
    t[0] = now_ns();
    vm_create(&v);                                  /* KVM_CREATE_VM */
    t[1] = now_ns();
    vm_add_memory(&v);                              /* mmap 64 MiB + KVM_SET_USER_MEMORY_REGION */
    t[2] = now_ns();
    if (irqchip) vm_add_irqchip(&v);                /* KVM_CREATE_IRQCHIP, GSI routing, KVM_CREATE_PIT2 */
    t[3] = now_ns();
    vm_create_vcpu(&v);                             /* KVM_CREATE_VCPU + mmap kvm_run */
    t[4] = now_ns();
    vcpu_setup(&v, 0);                              /* SET_CPUID2, GET_SREGS, SET_SREGS */
    vcpu_set_entry_regs(&v, 0);                     /* SET_REGS */
    load_guest(&v, img);                            /* GDT/TSS/page tables + guest bytes */
    t[5] = now_ns();
    watchdog_arm(v.run);
    unsigned reason = kvm_run(v.vcpu_fd, v.run);    /* KVM_RUN to the first exit */
    t[6] = now_ns();
    watchdog_disarm();
    if (!(reason == KVM_EXIT_IO && v.run->io.port == port && v.run->io.direction == KVM_EXIT_IO_OUT &&
          v.run->io.size == 1))
        unexpected_exit(v.run, reason, "(expected the guest's first OUT to the bench port)");
    vm_destroy(&v);                                 /* munmap kvm_run, close vCPU, VM; munmap RAM */
    t[7] = now_ns();
    for (int i = 0; i < PH_COUNT; i++) ph[i] = t[i + 1] - t[i];
    return t[7] - t[0];
}

static int cmd_lifecycle(int argc, char **argv) {
    g_bench = "lifecycle";
    opts_t o = parse_opts(argc, argv);
    uint64_t n = o.has_count ? o.count : 200, port = check_target(0, &o);
    if (n < 1 || n > 10000000) usage_error("--count must be 1..10000000");
    const char *path = o.guest ? o.guest : default_guest("bench_pio.bin");
    kvm_open();
    image_t img = image_load(path, 1, port);       /* one OUT: the first exit is the bench port */
    uint64_t ph[PH_COUNT];
    double *per = calloc(n, sizeof *per), *phase[PH_COUNT];
    for (int i = 0; i < PH_COUNT; i++) phase[i] = calloc(n, sizeof(double));
    one_lifecycle(&img, port, o.irqchip, ph);                         /* warm-up */
    uint64_t t0 = now_ns();
    for (uint64_t k = 0; k < n; k++) {
        per[k] = (double)one_lifecycle(&img, port, o.irqchip, ph);
        for (int i = 0; i < PH_COUNT; i++) phase[i][k] = (double)ph[i];
    }
    double total = (double)(now_ns() - t0);
    print_head("lifecycle", n, 1, per, (int)n, total, 1);
    printf(", \"phases_median_ns\": {");
    for (int i = 0; i < PH_COUNT; i++) printf("%s\"%s\": %.0f", i ? ", " : "", PHASE_NAMES[i], stats(phase[i], (int)n).median);
    printf("}, \"irqchip\": %s, \"target\": %llu, \"guest_ram_mib\": %llu, \"guest\": ", o.irqchip ? "true" : "false",
           (unsigned long long)port, GUEST_RAM_SIZE >> 20);
    json_string(stdout, path);
    printf("}\n");
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * boot: a multiboot kernel on pykvm's default machine, start to exit as one process.  The
 * multiboot information says what pykvm's loader says (command line "", memory, the same
 * four-entry memory map, no modules, a loader name); COM1 transmits every byte at once
 * (LSR = THRE | TEMT), so the guest's polling loop reads LSR once per byte, as under pykvm.
 * ------------------------------------------------------------------------------------------ */
#define MB_HEADER_MAGIC  0x1badb002u
#define MB_BOOT_MAGIC    0x2badb002u
#define MB_AOUT_KLUDGE   (1u << 16)
#define MB_SEARCH_BYTES  8192
#define MBI_ADDR         0x9000ull      /* the information structure; mmap, loader name, cmdline after it */
#define MBI_MMAP_ADDR    0x9100ull
#define MBI_LOADER_ADDR  0x9200ull
#define MBI_CMDLINE_ADDR 0x9280ull
#define MBI_FLAGS        ((1u << 0) | (1u << 2) | (1u << 3) | (1u << 6) | (1u << 9))  /* mem, cmdline, mods, mmap, loader */
#define COM1_BASE        0x3f8
#define COM1_LSR         (COM1_BASE + 5)
#define COM1_IIR         (COM1_BASE + 2)
#define LSR_IDLE         0x60           /* THRE | TEMT */
#define IIR_NONE         0x01

static uint32_t rd32(const uint8_t *p) { uint32_t x; memcpy(&x, p, 4); return x; }
static void wr32(uint8_t *p, uint32_t x) { memcpy(p, &x, 4); }
static void wr64(uint8_t *p, uint64_t x) { memcpy(p, &x, 8); }

/* Copy an a.out-kludge image where its header says; the entry point. */
static uint32_t load_multiboot(vm_t *v, const uint8_t *img, size_t len, const char *path) {
    for (size_t off = 0; off + 32 <= len && off < MB_SEARCH_BYTES; off += 4) {
        const uint8_t *h = img + off;
        uint32_t magic = rd32(h), flags = rd32(h + 4);
        if (magic != MB_HEADER_MAGIC || (uint32_t)(magic + flags + rd32(h + 8)) != 0) continue;
        if (!(flags & MB_AOUT_KLUDGE)) die("%s: not an a.out-kludge multiboot image (flags 0x%x)", path, flags);
        uint32_t header_addr = rd32(h + 12), load_addr = rd32(h + 16), load_end = rd32(h + 20);
        uint32_t bss_end = rd32(h + 24), entry = rd32(h + 28);
        if (header_addr < load_addr || header_addr - load_addr > off) die("%s: header_addr below load_addr", path);
        size_t start = off - (header_addr - load_addr);
        uint64_t size = load_end ? (uint64_t)load_end - load_addr : len - start;
        uint64_t end = bss_end > load_addr + size ? bss_end : load_addr + size;
        if (load_addr < GUEST_LOAD_ADDR || size > len - start || end > GUEST_RAM_SIZE || entry < load_addr || entry >= end)
            die("%s: the a.out-kludge addresses do not fit 1 MiB..%llu MiB", path, GUEST_RAM_SIZE >> 20);
        memcpy(v->mem + load_addr, img + start, size);      /* the bss is fresh, zeroed memory */
        return entry;
    }
    die("%s: no multiboot header in the first %d bytes", path, MB_SEARCH_BYTES);
}

static void write_multiboot_info(uint8_t *mem) {
    static const uint64_t map[][3] = {  /* base, length, type: pykvm's e820 map for 64 MiB */
        { 0, 0x9fc00, 1 }, { 0x9fc00, 0x400, 2 }, { 0xe0000, 0x20000, 2 }, { 0x100000, GUEST_RAM_SIZE - 0x100000, 1 },
    };
    uint8_t *mbi = mem + MBI_ADDR;
    memset(mbi, 0, 0x300);
    wr32(mbi + 0, MBI_FLAGS);
    wr32(mbi + 4, 0x9fc00 / 1024);                          /* mem_lower, KiB */
    wr32(mbi + 8, (uint32_t)((GUEST_RAM_SIZE - 0x100000) / 1024));
    wr32(mbi + 16, MBI_CMDLINE_ADDR);                       /* "" */
    wr32(mbi + 44, (uint32_t)(sizeof map / sizeof map[0] * 24));
    wr32(mbi + 48, MBI_MMAP_ADDR);
    wr32(mbi + 64, MBI_LOADER_ADDR);
    for (size_t i = 0; i < sizeof map / sizeof map[0]; i++) {
        uint8_t *e = mem + MBI_MMAP_ADDR + i * 24;
        wr32(e, 20);
        wr64(e + 4, map[i][0]);
        wr64(e + 12, map[i][1]);
        wr32(e + 20, (uint32_t)map[i][2]);
    }
    memcpy(mem + MBI_LOADER_ADDR, "rawkvm", 7);
}

static void vcpu_enter_protected(vm_t *v, uint32_t entry) {
    IOCTL(v->vcpu_fd, KVM_SET_CPUID2, g_cpuid);
    struct kvm_sregs s;
    IOCTL(v->vcpu_fd, KVM_GET_SREGS, &s);
    s.cs = seg(SEL_CODE32, 11, 0, 0, 1);
    s.ds = s.es = s.fs = s.gs = s.ss = seg(SEL_DATA, 3, 0, 0, 1);
    s.tr = (struct kvm_segment){ .base = TSS_ADDR, .limit = TSS_LIMIT, .selector = SEL_TSS, .type = 11,
                                 .present = 1 };
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = GDT_LIMIT;
    s.idt.base = 0;
    s.idt.limit = 0;
    s.cr0 = CR0_PE | CR0_ET;
    s.cr3 = s.cr4 = s.efer = 0;
    IOCTL(v->vcpu_fd, KVM_SET_SREGS, &s);
    struct kvm_regs r;
    memset(&r, 0, sizeof r);
    r.rip = entry;
    r.rsp = STACK_TOP;
    r.rflags = RFLAGS_FIXED;
    r.rax = MB_BOOT_MAGIC;
    r.rbx = MBI_ADDR;
    IOCTL(v->vcpu_fd, KVM_SET_REGS, &r);
}

static int cmd_boot(int argc, char **argv) {
    g_bench = "boot";
    opts_t o = parse_opts(argc, argv);
    if (!o.guest) usage_error("boot needs --guest KERNEL");
    int to_stdout = 0;
    if (o.serial && !strcmp(o.serial, "stdio")) to_stdout = 1;
    else if (o.serial && strcmp(o.serial, "none")) usage_error("--serial must be none or stdio");
    int irqchip = o.has_irqchip ? o.irqchip : 1;
    FILE *f = fopen(o.guest, "rb");
    if (!f) die("cannot open %s: %s", o.guest, strerror(errno));
    static uint8_t img[GUEST_RAM_SIZE - GUEST_LOAD_ADDR];
    size_t len = fread(img, 1, sizeof img, f);
    fclose(f);

    kvm_open();
    vm_t v;
    vm_create(&v);
    vm_add_memory(&v);
    if (irqchip) vm_add_irqchip(&v);
    vm_create_vcpu(&v);
    write_boot_tables(v.mem);
    uint32_t entry = load_multiboot(&v, img, len, o.guest);
    write_multiboot_info(v.mem);
    vcpu_enter_protected(&v, entry);

    struct kvm_run *run = v.run;
    uint64_t exits = 0, serial_bytes = 0;
    int status = -1;
    watchdog_arm(run);
    while (status < 0) {
        unsigned reason = kvm_run(v.vcpu_fd, run);
        exits++;
        if (reason == KVM_EXIT_IO) {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            size_t n = (size_t)run->io.size * run->io.count;
            if (run->io.direction == KVM_EXIT_IO_OUT) {
                if (run->io.port == DEBUG_EXIT_PORT) status = (data[0] << 1) | 1;
                else if (run->io.port == COM1_BASE) {
                    serial_bytes += n;
                    if (to_stdout) fwrite(data, 1, n, stdout);
                }
            } else {
                int com1 = run->io.port >= COM1_BASE && run->io.port < COM1_BASE + 8;
                uint8_t value = run->io.port == COM1_LSR ? LSR_IDLE : run->io.port == COM1_IIR ? IIR_NONE : com1 ? 0 : 0xff;
                memset(data, value, n);
            }
        } else if (reason == KVM_EXIT_MMIO) {
            if (!run->mmio.is_write) memset(run->mmio.data, 0xff, sizeof run->mmio.data);
        } else if (reason == KVM_EXIT_HLT) {
            status = 0;
        } else {
            unexpected_exit(run, reason, "(rawkvm boot answers port I/O, MMIO and HLT only)");
        }
    }
    watchdog_disarm();
    fflush(stdout);
    fprintf(stderr, "{\"bench\": \"boot\", \"ok\": true, \"irqchip\": %s, \"status\": %d, \"exits\": %llu, "
            "\"serial_bytes\": %llu, \"entry\": %u}\n", irqchip ? "true" : "false", status,
            (unsigned long long)exits, (unsigned long long)serial_bytes, entry);
    vm_destroy(&v);
    return status;
}

/* ------------------------------------------------------------------------------------------
 * compute / native: the same arithmetic loop in the guest at CPL3 and on the host.
 * ------------------------------------------------------------------------------------------ */

/* Plain C model of the loop, used only to check both measured versions. */
static uint64_t rol64(uint64_t x, unsigned r) { return (x << r) | (x >> (64 - r)); }
static uint64_t compute_reference(uint64_t n) {
    uint64_t a = COMPUTE_SEED_RAX, b = COMPUTE_SEED_RBX, d = COMPUTE_SEED_RDX;
    for (uint64_t c = n; c; c--) {
        a += b;
        d ^= a;
        d = rol64(d, 13);
        b += d;
        a ^= c;
        b = rol64(b, 64 - 7);
    }
    return a ^ b ^ d;
}

static uint64_t compute_native(uint64_t n) {
    uint64_t a = COMPUTE_SEED_RAX, b = COMPUTE_SEED_RBX, d = COMPUTE_SEED_RDX, c = n;
    __asm__ volatile(COMPUTE_LOOP_ASM : "+a"(a), "+b"(b), "+d"(d), "+c"(c) : : "cc");
    return a;
}

static uint64_t run_compute(vm_t *v, int cpl, uint64_t *result) {
    struct kvm_run *run = v->run;
    vcpu_set_entry_regs(v, cpl);
    watchdog_arm(run);
    uint64_t t0 = now_ns();
    unsigned reason = kvm_run(v->vcpu_fd, run);
    uint64_t t1 = now_ns();
    watchdog_disarm();
    if (!is_debug_exit(run, reason)) unexpected_exit(run, reason, "(expected the result on port 0xf4)");
    struct kvm_regs r;
    IOCTL(v->vcpu_fd, KVM_GET_REGS, &r);
    if ((r.rax & 0xff) != io_byte(run))
        die("guest sent result byte 0x%02x but rax is 0x%016llx", io_byte(run), (unsigned long long)r.rax);
    *result = r.rax;
    return t1 - t0;
}

static void print_compute_tail(uint64_t result, uint64_t expected) {
    printf(", \"result\": %u, \"result64\": \"0x%016llx\", \"expected64\": \"0x%016llx\"",
           (unsigned)(result & 0xff), (unsigned long long)result, (unsigned long long)expected);
}

static int cmd_compute(int argc, char **argv) {
    g_bench = "compute";
    opts_t o = parse_opts(argc, argv);
    int cpl = o.cpl < 0 ? 3 : o.cpl;
    uint64_t n = o.has_count ? o.count : 100000000;
    if (n < 1) usage_error("--count must be at least 1");
    const char *path = o.guest ? o.guest : default_guest("bench_compute.bin");
    uint64_t expected = compute_reference(n);
    kvm_open();
    image_t img = image_load(path, n, 0);
    vm_t v;
    vm_boot(&v, &img, cpl);

    double *per = calloc((size_t)o.repeat, sizeof *per), *tot = calloc((size_t)o.repeat, sizeof *tot);
    uint64_t result;
    run_compute(&v, cpl, &result);                                     /* warm-up */
    for (int k = 0; k < o.repeat; k++) {
        uint64_t ns = run_compute(&v, cpl, &result);
        if (result != expected)
            die("guest computed 0x%016llx, expected 0x%016llx", (unsigned long long)result, (unsigned long long)expected);
        tot[k] = (double)ns;
        per[k] = (double)ns / (double)n;
    }
    print_head("iteration", n, o.repeat, per, o.repeat, stats(tot, o.repeat).median, 1);
    printf(", \"cpl\": %d", cpl);
    print_compute_tail(result, expected);
    printf(", \"guest\": ");
    json_string(stdout, path);
    printf("}\n");
    vm_destroy(&v);
    return 0;
}

static int cmd_native(int argc, char **argv) {
    g_bench = "native";
    opts_t o = parse_opts(argc, argv);
    uint64_t n = o.has_count ? o.count : 100000000;
    if (n < 1) usage_error("--count must be at least 1");
    uint64_t expected = compute_reference(n), result = 0;
    double *per = calloc((size_t)o.repeat, sizeof *per), *tot = calloc((size_t)o.repeat, sizeof *tot);
    compute_native(n);                                                 /* warm-up */
    for (int k = 0; k < o.repeat; k++) {
        uint64_t t0 = now_ns();
        result = compute_native(n);
        uint64_t ns = now_ns() - t0;
        if (result != expected)
            die("native loop computed 0x%016llx, expected 0x%016llx", (unsigned long long)result, (unsigned long long)expected);
        tot[k] = (double)ns;
        per[k] = (double)ns / (double)n;
    }
    print_head("iteration", n, o.repeat, per, o.repeat, stats(tot, o.repeat).median, 1);
    print_compute_tail(result, expected);
    printf("}\n");
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * tsc: TSC ticks per second, against CLOCK_MONOTONIC_RAW over --count milliseconds.
 * ------------------------------------------------------------------------------------------ */
static uint64_t rdtsc(void) {
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

static uint64_t raw_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC_RAW, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

static int cmd_tsc(int argc, char **argv) {
    g_bench = "tsc";
    opts_t o = parse_opts(argc, argv);
    uint64_t ms = o.has_count ? o.count : 200;
    if (ms < 10 || ms > 10000) usage_error("--count (milliseconds) must be 10..10000");
    uint64_t t0 = raw_ns(), c0 = rdtsc(), t1, c1;
    do {
        t1 = raw_ns();
        c1 = rdtsc();
    } while (t1 - t0 < ms * 1000000ull);
    printf("{\"bench\": \"tsc\", \"ok\": true, \"hz\": %.0f, \"over_ns\": %llu}\n",
           (double)(c1 - c0) * 1e9 / (double)(t1 - t0), (unsigned long long)(t1 - t0));
    return 0;
}

/* ------------------------------------------------------------------------------------------
 * state: the entry state, as KVM reports it back after rawkvm's setup.
 * ------------------------------------------------------------------------------------------ */
static void print_seg(const char *name, const struct kvm_segment *s) {
    printf(", \"%s\": {\"selector\": %u, \"base\": %llu, \"limit\": %u, \"type\": %u, \"present\": %u, \"dpl\": %u, "
           "\"db\": %u, \"s\": %u, \"l\": %u, \"g\": %u, \"avl\": %u, \"unusable\": %u}",
           name, s->selector, (unsigned long long)s->base, s->limit, s->type, s->present, s->dpl, s->db, s->s, s->l,
           s->g, s->avl, s->unusable);
}

static int cmd_state(int argc, char **argv) {
    g_bench = "state";
    opts_t o = parse_opts(argc, argv);
    int cpl = o.cpl < 0 ? 0 : o.cpl;
    kvm_open();
    static uint8_t dummy[PARAM_BLOCK_SIZE] = { 0xeb, PARAM_BLOCK_SIZE - 2 };
    image_t img = { dummy, sizeof dummy };
    vm_t v;
    vm_boot(&v, &img, cpl);
    struct kvm_regs r;
    struct kvm_sregs s;
    IOCTL(v.vcpu_fd, KVM_GET_REGS, &r);
    IOCTL(v.vcpu_fd, KVM_GET_SREGS, &s);
    printf("{\"bench\": \"state\", \"ok\": true, \"cpl\": %d, \"rip\": %llu, \"rsp\": %llu, \"rflags\": %llu, "
           "\"other_gprs\": 0",
           cpl, (unsigned long long)r.rip, (unsigned long long)r.rsp, (unsigned long long)r.rflags);
    print_seg("cs", &s.cs); print_seg("ds", &s.ds); print_seg("es", &s.es); print_seg("fs", &s.fs);
    print_seg("gs", &s.gs); print_seg("ss", &s.ss); print_seg("tr", &s.tr); print_seg("ldt", &s.ldt);
    printf(", \"gdt\": {\"base\": %llu, \"limit\": %u}, \"idt\": {\"base\": %llu, \"limit\": %u}",
           (unsigned long long)s.gdt.base, s.gdt.limit, (unsigned long long)s.idt.base, s.idt.limit);
    printf(", \"cr0\": %llu, \"cr2\": %llu, \"cr3\": %llu, \"cr4\": %llu, \"cr8\": %llu, \"efer\": %llu, \"apic_base\": %llu",
           (unsigned long long)s.cr0, (unsigned long long)s.cr2, (unsigned long long)s.cr3, (unsigned long long)s.cr4,
           (unsigned long long)s.cr8, (unsigned long long)s.efer, (unsigned long long)s.apic_base);
    printf(", \"gdt_entries\": [");
    for (int i = 0; i <= GDT_LIMIT / 8; i++)
        printf("%s\"0x%016llx\"", i ? ", " : "", (unsigned long long)((uint64_t *)(v.mem + GDT_ADDR))[i]);
    printf("], \"tss_rsp0\": %llu, \"tss_iomap_base\": %u",
           (unsigned long long)*(uint64_t *)(v.mem + TSS_ADDR + 4), *(uint16_t *)(v.mem + TSS_ADDR + 0x66));
    printf(", \"pml4e0\": \"0x%llx\", \"pdpte0\": \"0x%llx\", \"pde0\": \"0x%llx\", \"cpuid_entries\": %u}\n",
           (unsigned long long)*(uint64_t *)(v.mem + PML4_ADDR), (unsigned long long)*(uint64_t *)(v.mem + PDPT_ADDR),
           (unsigned long long)*(uint64_t *)(v.mem + PD_ADDR), g_cpuid->nent);
    vm_destroy(&v);
    return 0;
}

int main(int argc, char **argv) {
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        fputs(USAGE, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *c = argv[1];
    if (!strcmp(c, "exits")) return cmd_exits(argc, argv);
    if (!strcmp(c, "ioeventfd")) return cmd_ioeventfd(argc, argv);
    if (!strcmp(c, "lifecycle")) return cmd_lifecycle(argc, argv);
    if (!strcmp(c, "boot")) return cmd_boot(argc, argv);
    if (!strcmp(c, "tsc")) return cmd_tsc(argc, argv);
    if (!strcmp(c, "compute")) return cmd_compute(argc, argv);
    if (!strcmp(c, "native")) return cmd_native(argc, argv);
    if (!strcmp(c, "state")) return cmd_state(argc, argv);
    usage_error("unknown subcommand %s", c);
}
