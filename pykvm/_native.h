/* The cdef of pykvm's C fast path: what Python sees of _native.c and of <linux/kvm.h>.
 *
 * Kernel structures are declared with "...;" so that cffi takes their real layout from
 * <linux/kvm.h> at build time; only the fields pykvm uses are named.  Constants are
 * declared "..." so the compiler fills in the header's values.
 */

/* ---- <linux/kvm.h> ---- */
typedef int... __u8;
typedef int... __u16;
typedef int... __u32;
typedef int... __u64;
typedef int... __s32;
typedef int... __s64;

#define KVMIO ...
#define KVM_API_VERSION ...

#define KVM_GET_API_VERSION ...
#define KVM_CREATE_VM ...
#define KVM_CHECK_EXTENSION ...
#define KVM_GET_VCPU_MMAP_SIZE ...
#define KVM_GET_SUPPORTED_CPUID ...
#define KVM_GET_MSR_INDEX_LIST ...
#define KVM_CREATE_VCPU ...
#define KVM_SET_USER_MEMORY_REGION ...
#define KVM_SET_TSS_ADDR ...
#define KVM_SET_IDENTITY_MAP_ADDR ...
#define KVM_RUN ...
#define KVM_GET_REGS ...
#define KVM_SET_REGS ...
#define KVM_GET_SREGS ...
#define KVM_SET_SREGS ...
#define KVM_SET_CPUID2 ...
#define KVM_GET_MSRS ...
#define KVM_SET_MSRS ...
#define KVM_ENABLE_CAP ...
#define KVM_IOEVENTFD ...
#define KVM_CREATE_IRQCHIP ...
#define KVM_IRQFD ...
#define KVM_IRQFD_FLAG_DEASSIGN ...
#define KVM_IRQ_LINE ...
#define KVM_SET_GSI_ROUTING ...
#define KVM_CREATE_PIT2 ...
#define KVM_GET_MP_STATE ...
#define KVM_SET_MP_STATE ...
#define KVM_GET_CPUID2 ...
#define KVM_GET_FPU ...
#define KVM_SET_FPU ...
#define KVM_GET_XSAVE ...
#define KVM_GET_XSAVE2 ...
#define KVM_SET_XSAVE ...
#define KVM_GET_XCRS ...
#define KVM_SET_XCRS ...
#define KVM_GET_DEBUGREGS ...
#define KVM_SET_DEBUGREGS ...
#define KVM_GET_LAPIC ...
#define KVM_SET_LAPIC ...
#define KVM_GET_VCPU_EVENTS ...
#define KVM_SET_VCPU_EVENTS ...
#define KVM_SET_GUEST_DEBUG ...
#define KVM_TRANSLATE ...
#define KVM_GET_IRQCHIP ...
#define KVM_SET_IRQCHIP ...
#define KVM_GET_PIT2 ...
#define KVM_SET_PIT2 ...
#define KVM_GET_CLOCK ...
#define KVM_SET_CLOCK ...
#define KVM_GET_DIRTY_LOG ...
#define KVM_CLEAR_DIRTY_LOG ...
#define KVM_MEM_LOG_DIRTY_PAGES ...
#define KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE ...
#define KVM_DIRTY_LOG_INITIALLY_SET ...
#define KVM_GUESTDBG_ENABLE ...
#define KVM_GUESTDBG_SINGLESTEP ...
#define KVM_GUESTDBG_USE_SW_BP ...
#define KVM_GUESTDBG_USE_HW_BP ...
#define KVM_GUESTDBG_INJECT_DB ...
#define KVM_GUESTDBG_INJECT_BP ...
#define KVM_GUESTDBG_BLOCKIRQ ...
#define KVM_CLOCK_TSC_STABLE ...
#define KVM_CLOCK_REALTIME ...
#define KVM_CLOCK_HOST_TSC ...
#define KVM_PIT_SPEAKER_DUMMY ...
#define KVM_IRQ_ROUTING_IRQCHIP ...
#define KVM_IRQCHIP_PIC_MASTER ...
#define KVM_IRQCHIP_PIC_SLAVE ...
#define KVM_IRQCHIP_IOAPIC ...
#define KVM_MP_STATE_RUNNABLE ...
#define KVM_MP_STATE_UNINITIALIZED ...
#define KVM_MP_STATE_INIT_RECEIVED ...
#define KVM_MP_STATE_HALTED ...
#define KVM_MP_STATE_SIPI_RECEIVED ...
#define KVM_IOEVENTFD_FLAG_DATAMATCH ...
#define KVM_IOEVENTFD_FLAG_PIO ...
#define KVM_IOEVENTFD_FLAG_DEASSIGN ...

#define KVM_EXIT_UNKNOWN ...
#define KVM_EXIT_EXCEPTION ...
#define KVM_EXIT_IO ...
#define KVM_EXIT_HYPERCALL ...
#define KVM_EXIT_DEBUG ...
#define KVM_EXIT_HLT ...
#define KVM_EXIT_MMIO ...
#define KVM_EXIT_IRQ_WINDOW_OPEN ...
#define KVM_EXIT_SHUTDOWN ...
#define KVM_EXIT_FAIL_ENTRY ...
#define KVM_EXIT_INTR ...
#define KVM_EXIT_INTERNAL_ERROR ...
#define KVM_EXIT_SYSTEM_EVENT ...
#define KVM_EXIT_X86_RDMSR ...
#define KVM_EXIT_X86_WRMSR ...
#define KVM_EXIT_IO_IN ...
#define KVM_EXIT_IO_OUT ...
#define KVM_SYNC_X86_REGS ...

#define KVM_CAP_IRQCHIP ...
#define KVM_CAP_HLT ...
#define KVM_CAP_USER_MEMORY ...
#define KVM_CAP_SET_TSS_ADDR ...
#define KVM_CAP_EXT_CPUID ...
#define KVM_CAP_NR_VCPUS ...
#define KVM_CAP_MAX_VCPUS ...
#define KVM_CAP_NR_MEMSLOTS ...
#define KVM_CAP_PIT2 ...
#define KVM_CAP_IOEVENTFD ...
#define KVM_CAP_IRQFD ...
#define KVM_CAP_SYNC_REGS ...
#define KVM_CAP_IMMEDIATE_EXIT ...
#define KVM_CAP_READONLY_MEM ...
#define KVM_CAP_MP_STATE ...
#define KVM_CAP_XSAVE ...
#define KVM_CAP_X86_USER_SPACE_MSR ...
#define KVM_CAP_DIRTY_LOG_RING ...
#define KVM_CAP_SPLIT_IRQCHIP ...
#define KVM_CAP_TSC_CONTROL ...
#define KVM_CAP_X2APIC_API ...
#define KVM_CAP_IRQ_ROUTING ...
#define KVM_CAP_XSAVE2 ...
#define KVM_CAP_XCRS ...
#define KVM_CAP_DEBUGREGS ...
#define KVM_CAP_VCPU_EVENTS ...
#define KVM_CAP_ADJUST_CLOCK ...
#define KVM_CAP_PIT_STATE2 ...
#define KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 ...
#define KVM_CAP_SET_GUEST_DEBUG ...
#define KVM_CAP_SET_GUEST_DEBUG2 ...

struct kvm_regs {
    __u64 rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    __u64 r8, r9, r10, r11, r12, r13, r14, r15;
    __u64 rip, rflags;
};

struct kvm_segment {
    __u64 base;
    __u32 limit;
    __u16 selector;
    __u8 type;
    __u8 present, dpl, db, s, l, g, avl;
    __u8 unusable;
    ...;
};

struct kvm_dtable {
    __u64 base;
    __u16 limit;
    ...;
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    __u64 cr0, cr2, cr3, cr4, cr8;
    __u64 efer;
    __u64 apic_base;
    ...;
};

struct kvm_userspace_memory_region {
    __u32 slot;
    __u32 flags;
    __u64 guest_phys_addr;
    __u64 memory_size;
    __u64 userspace_addr;
};

struct kvm_cpuid_entry2 {
    __u32 function;
    __u32 index;
    __u32 flags;
    __u32 eax, ebx, ecx, edx;
    ...;
};

struct kvm_cpuid2 {
    __u32 nent;
    struct kvm_cpuid_entry2 entries[];
    ...;
};

struct kvm_msr_entry {
    __u32 index;
    __u64 data;
    ...;
};

struct kvm_msrs {
    __u32 nmsrs;
    struct kvm_msr_entry entries[];
    ...;
};

struct kvm_msr_list {
    __u32 nmsrs;
    __u32 indices[];
    ...;
};

struct kvm_ioeventfd {
    __u64 datamatch;
    __u64 addr;
    __u32 len;
    __s32 fd;
    __u32 flags;
    ...;
};

struct kvm_irq_level {
    __u32 irq;
    __u32 level;
    ...;
};

struct kvm_pit_config {
    __u32 flags;
    ...;
};

struct kvm_mp_state {
    __u32 mp_state;
};

struct kvm_irq_routing_irqchip {
    __u32 irqchip;
    __u32 pin;
};

struct kvm_irq_routing_entry {
    __u32 gsi;
    __u32 type;
    __u32 flags;
    union {
        struct kvm_irq_routing_irqchip irqchip;
        __u32 pad[8];
    } u;
    ...;
};

struct kvm_irq_routing {
    __u32 nr;
    __u32 flags;
    struct kvm_irq_routing_entry entries[];
    ...;
};

/* State carried as the raw bytes of the kernel's struct: only their sizes are needed. */
struct kvm_fpu { ...; };
struct kvm_xcrs { ...; };
struct kvm_debugregs { ...; };
struct kvm_lapic_state { ...; };
struct kvm_vcpu_events { ...; };

struct kvm_xsave {
    __u32 region[1024];
    __u32 extra[];
    ...;
};

struct kvm_irqchip {
    __u32 chip_id;
    union { char dummy[512]; } chip;
    ...;
};

struct kvm_pit_channel_state {
    __u32 count;
    __u16 latched_count;
    __u8 count_latched, status_latched, status, read_state, write_state, write_latch;
    __u8 rw_mode, mode, bcd, gate;
    __s64 count_load_time;
    ...;
};

struct kvm_pit_state2 {
    struct kvm_pit_channel_state channels[3];
    __u32 flags;
    ...;
};

struct kvm_clock_data {
    __u64 clock;
    __u32 flags;
    __u64 realtime;
    __u64 host_tsc;
    ...;
};

struct kvm_dirty_log {
    __u32 slot;
    void *dirty_bitmap;
    ...;
};

struct kvm_clear_dirty_log {
    __u32 slot;
    __u32 num_pages;
    __u64 first_page;
    void *dirty_bitmap;
    ...;
};

struct kvm_guest_debug_arch {
    __u64 debugreg[8];
};

struct kvm_guest_debug {
    __u32 control;
    struct kvm_guest_debug_arch arch;
    ...;
};

struct kvm_translation {
    __u64 linear_address;
    __u64 physical_address;
    __u8 valid;
    __u8 writeable;
    __u8 usermode;
    ...;
};

struct kvm_debug_exit_arch {  /* complete: kvm_run's anonymous debug member holds it */
    __u32 exception;
    __u32 pad;
    __u64 pc;
    __u64 dr6;
    __u64 dr7;
};

struct kvm_irqfd {
    __u32 fd;
    __u32 gsi;
    __u32 flags;
    ...;
};

struct kvm_enable_cap {
    __u32 cap;
    __u32 flags;
    __u64 args[4];
    ...;
};

struct kvm_run {
    __u8 request_interrupt_window;
    __u8 immediate_exit;
    __u32 exit_reason;
    __u8 ready_for_interrupt_injection;
    __u8 if_flag;
    __u16 flags;
    __u64 cr8;
    __u64 apic_base;
    union {
        struct { __u64 hardware_exit_reason; } hw;
        struct { __u64 hardware_entry_failure_reason; __u32 cpu; } fail_entry;
        struct { struct kvm_debug_exit_arch arch; } debug;
        struct { __u32 exception; __u32 error_code; } ex;
        struct { __u8 direction; __u8 size; __u16 port; __u32 count; __u64 data_offset; } io;
        struct { __u64 phys_addr; __u8 data[8]; __u32 len; __u8 is_write; } mmio;
        struct { __u32 suberror; __u32 ndata; __u64 data[16]; } internal;
        struct { __u32 type; __u32 ndata; __u64 data[16]; } system_event;
        char padding[256];
    };
    __u64 kvm_valid_regs;
    __u64 kvm_dirty_regs;
    ...;
};

/* ---- <sys/mman.h>, <fcntl.h>: flags Python does not export ---- */
#define MAP_NORESERVE ...
#define FALLOC_FL_KEEP_SIZE ...
#define FALLOC_FL_PUNCH_HOLE ...
#define FALLOC_FL_ZERO_RANGE ...

/* ---- _native.c ---- */
#define PYKVM_FAST_MAX ...
#define PYKVM_EXIT_REASONS ...
#define PYKVM_ADDRESSES_KEPT ...
#define PYKVM_ADDRESS_SLOTS ...

enum pykvm_fast_kind {
    PYKVM_FAST_CONSTANT,    /* reads return `value`, writes are ignored */
    PYKVM_FAST_DEBUG_EXIT,  /* a write ends the run with PYKVM_STOP_DEBUG_EXIT */
    PYKVM_FAST_SERIAL_TX,   /* 1-byte writes go to `serial` (pykvm_serial_write) */
    PYKVM_FAST_BYTE_REGISTER, /* a 1-byte read gives `value`, kept current by the device model */
    ...
};

enum pykvm_space { PYKVM_SPACE_PIO, PYKVM_SPACE_MMIO, ... };

enum pykvm_stop {
    PYKVM_STOP_EXIT,        /* an exit Python must handle: see run->exit_reason */
    PYKVM_STOP_DEBUG_EXIT,  /* a debug-exit port was written: see debug_exit_value */
    PYKVM_STOP_INTERRUPTED, /* KVM_RUN returned EINTR (a signal or immediate_exit) */
    PYKVM_STOP_REQUESTED,   /* the loop's stop flag was set */
    ...
};

#define PYKVM_SERIAL_FDS ...

struct pykvm_serial_out {
    int fds[...];
    uint32_t stalled[...];
    uint64_t stall_ns;
    uint64_t transmitted;
    uint64_t dropped;
    uint64_t stalls;
    int error;
    ...;
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
    ...;
};

struct pykvm_fast_table {
    uint32_t count;
    struct pykvm_fast_handler handlers[...];
    ...;
};

struct pykvm_exit {
    uint32_t reason;
    uint32_t is_write;
    uint64_t address;
    uint32_t size;
    uint32_t count;
    uint64_t value;
    uint64_t data_offset;
    ...;
};

struct pykvm_address_count {
    uint64_t key;
    uint64_t count;
};

struct pykvm_loop {
    int vcpu_fd;
    struct kvm_run *run;
    struct pykvm_exit exit;
    uint32_t stop;
    struct pykvm_fast_table *table;
    uint64_t exits[...];
    uint64_t exit_count;
    uint64_t python_from;
    uint64_t fast_exits;
    uint64_t guest_ns;
    uint64_t fast_ns;
    uint64_t python_ns;
    uint64_t debug_exit_value;
    struct pykvm_address_count addresses[...];
    uint32_t addresses_kept;
    uint64_t other_addresses;
    ...;
};

int pykvm_ioctl(int fd, unsigned long request, void *arg);
int pykvm_ioctl_value(int fd, unsigned long request, unsigned long value);
int pykvm_fallocate(int fd, int mode, int64_t offset, int64_t length);
int pykvm_loop_run(struct pykvm_loop *loop);
int pykvm_install_kick_handler(int signo);
int pykvm_serial_write(struct pykvm_serial_out *out, const uint32_t *stop, const uint8_t *data, size_t len);
uint8_t *pykvm_io_data(struct kvm_run *run);
struct kvm_regs *pykvm_sync_regs(struct kvm_run *run);

/* ---- virtqueue descriptor chains ---- */
#define PYKVM_MEM_REGIONS_MAX ...

enum pykvm_chain_error {
    PYKVM_CHAIN_BAD_HEAD, PYKVM_CHAIN_BAD_TABLE, PYKVM_CHAIN_BAD_BUFFER, PYKVM_CHAIN_TOO_LONG,
    PYKVM_CHAIN_BAD_NEXT, PYKVM_CHAIN_NESTED_INDIRECT, PYKVM_CHAIN_BAD_INDIRECT,
    PYKVM_CHAIN_TOO_MANY_BUFFERS, PYKVM_CHAIN_TOO_LARGE, PYKVM_CHAIN_INDIRECT_NOT_NEGOTIATED,
    ...
};

struct pykvm_mem_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t host;
    uint64_t *written;
};

struct pykvm_guest_memory {
    uint32_t count;
    struct pykvm_mem_region regions[...];
};

struct pykvm_buffer {
    uint64_t gpa;
    uint64_t host;
    uint32_t len;
    uint32_t writable;
};

int64_t pykvm_save_pages(int fd, const uint8_t *mem, uint64_t length, uint64_t file_offset, int pagemap_fd);

int pykvm_chain_walk(const struct pykvm_guest_memory *mem, uint64_t desc_table, uint32_t queue_size,
                     uint32_t head, int indirect_ok, struct pykvm_buffer *out, uint32_t max_out);

/* ---- guest pages written by the host ---- */
void pykvm_note_written(const struct pykvm_guest_memory *mem, uint64_t gpa, uint64_t length);
void pykvm_take_written(uint64_t *bitmap, uint64_t *copy, uint64_t words);

/* ---- virtio-blk: the plain requests ---- */
#define PYKVM_BLK_BUFFERS_MAX ...

enum pykvm_blk_counter {
    PYKVM_BLK_READS, PYKVM_BLK_WRITES, PYKVM_BLK_BYTES_READ, PYKVM_BLK_BYTES_WRITTEN, PYKVM_BLK_FLUSHES,
    PYKVM_BLK_WRITE_THROUGH_SYNCS, PYKVM_BLK_ERRORS, PYKVM_BLK_IO_ERRORS, PYKVM_BLK_COUNTERS, ...
};

struct pykvm_blk {
    const struct pykvm_guest_memory *mem;
    int fd;
    uint32_t read_only;
    uint32_t write_through;
    uint32_t seg_max;
    uint64_t max_bytes;
    uint64_t capacity;
    uint64_t desc_table, avail_ring, used_ring;
    uint32_t size;
    uint32_t indirect;
    uint32_t event_idx;
    uint16_t next_avail, next_used;
    struct pykvm_buffer *buffers;
    uint64_t counts[...];
    int sync_errno;
    uint32_t python_next;
    ...;
};

int pykvm_blk_serve(struct pykvm_blk *blk, uint32_t limit);
