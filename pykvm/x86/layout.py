"""Guest-physical addresses of the x86 machine pykvm builds.

Every address the VMM places something at lives here, with what it is for.
The VMM's boot structures (GDT, TSS, page tables, stack, boot information,
command line) have a preferred place in low memory (below 1 MiB): a loader
puts each one there when the image leaves that range free, and elsewhere in
free RAM otherwise (:mod:`pykvm.boot.placement`), so an image may load
anywhere in guest RAM.  Kernels usually load at ``HIMEM_START``; the MMIO
hole below 4 GiB is never RAM.
"""

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
PAGE_SIZE = 4 * KIB
HUGE_PAGE_SIZE = 2 * MIB

# The real-mode interrupt vector table and the BIOS data area: the VMM never places
# anything below this address.
BOOT_STRUCTURES_LOWEST = 0x500
# The preferred places of the VMM's boot structures follow.
# Global descriptor table written by the VMM for protected and long mode entry.
BOOT_GDT_START = 0x500
# Identity-mapping page tables for long mode: PML4, one PDPT, four page directories
# of 2 MiB pages, covering the low 4 GiB (RAM and the MMIO hole); one block of pages.
PML4_START = 0x1000
PDPT_START = 0x2000
PD_START = 0x3000
PD_COUNT = 4
PAGE_TABLES_SIZE = (2 + PD_COUNT) * PAGE_SIZE
IDENTITY_MAP_END = 4 * GIB
# Linux boot_params ("zero page").
ZERO_PAGE_START = 0x7000
# Real mode: where a flat binary loads by default (where a BIOS puts a boot sector).
REAL_MODE_LOAD_ADDR = 0x7C00
# The stack the VMM gives protected and long mode entry (the stack pointer sits just
# below its top), also the TSS's RSP0.
BOOT_STACK_START = 0x8000
BOOT_STACK_SIZE = 0x1000
BOOT_STACK_POINTER = 0x8FF0
# Multiboot information structure (or PVH start info) and what it points at.
MULTIBOOT_INFO_START = 0x9000
# The TSS the VMM's GDT points at: RSP0 for interrupts taken at CPL3, and an I/O
# permission bitmap allowing every port (8 KiB + the terminating byte).
BOOT_TSS_START = 0xA000
BOOT_TSS_END = 0xC100
# End of conventional memory (640 KiB): the EBDA, VGA memory and BIOS area follow.
EBDA_START = 0x9FC00
LOW_MEMORY_END = 0xA0000
# The BIOS area, reserved in the memory map (ACPI tables live here).
BIOS_AREA_START = 0xE0000
BIOS_AREA_END = 0x100000
# Kernel command line (a multiboot or PVH kernel's, and a bzImage's 32/64-bit entry's).
CMDLINE_START = 0x20000
CMDLINE_MAX_SIZE = 0x10000
# A bzImage entered through its 16-bit setup code: where the setup goes (its segment is
# 0x9000, the "0x90000-style" placement of boot.rst), and the heap and command line after it.
LINUX_SETUP_START = 0x90000
# Where kernels (multiboot, ELF, bzImage) and protected/long mode flat binaries load.
HIMEM_START = 0x100000
# The MMIO hole below 4 GiB: never RAM; devices and the LAPIC/IOAPIC live here.
MMIO_HOLE_START = 0xC000_0000
MMIO_HOLE_END = 0x1_0000_0000
# Three pages Intel hosts need for real-mode emulation (KVM_SET_TSS_ADDR) and one for the
# identity map of unpaged guests (KVM_SET_IDENTITY_MAP_ADDR): inside the MMIO hole, never RAM.
KVM_IDENTITY_MAP_ADDR = 0xFFFB_C000
KVM_TSS_ADDR = 0xFFFB_D000
# Firmware tables, inside the BIOS area where guests scan for them: the ACPI RSDP and the
# tables it points to, then the MP floating pointer and MP configuration table.
ACPI_START = 0xE0000
ACPI_END = 0xF0000
MPTABLE_START = 0xF0000
MPTABLE_END = 0xF1000
# The in-kernel interrupt controllers' MMIO windows (inside the MMIO hole).
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000
# virtio-mmio devices: one 4 KiB window each, from here up, in the order they are attached.
VIRTIO_MMIO_START = 0xD000_0000
VIRTIO_MMIO_STRIDE = 0x1000

# --- the port map: where the legacy devices answer (QEMU's PC addresses) --------------------
# The PIC (0x20, 0xa0), the PIT (0x40-0x43) and the speaker port (0x61) are KVM's own.
I8042_PORT, I8042_PORTS = 0x60, 5  # data 0x60, status/command 0x64
CMOS_PORT, CMOS_PORTS = 0x70, 2  # index, data
POST_PORT = 0x80  # POST codes: written by firmware and some kernels as an I/O delay
DEBUG_EXIT_PORT, DEBUG_EXIT_PORTS = 0xF4, 4  # QEMU's isa-debug-exit
COM1_PORT, COM1_PORTS = 0x3F8, 8  # the 16550A UART's eight registers
FW_CFG_PORT, FW_CFG_PORTS = 0x510, 2  # selector, data
ACPI_PM_PORT, ACPI_PM_PORTS = 0x600, 12  # PM1a event and control blocks, PM timer

# What --stats calls each well-known port.
_COM1_REGISTERS = ("THR/RBR", "IER", "IIR/FCR", "LCR", "MCR", "LSR", "MSR", "SCR")
PORT_NAMES = {
    **{COM1_PORT + i: f"COM1 {name}" for i, name in enumerate(_COM1_REGISTERS)},
    I8042_PORT: "i8042 data", I8042_PORT + 4: "i8042 status/command",
    CMOS_PORT: "CMOS index", CMOS_PORT + 1: "CMOS data",
    POST_PORT: "POST",
    **{DEBUG_EXIT_PORT + i: "debug exit" for i in range(DEBUG_EXIT_PORTS)},
    FW_CFG_PORT: "fw_cfg selector", FW_CFG_PORT + 1: "fw_cfg data",
    **{ACPI_PM_PORT + i: "ACPI PM1a event" for i in range(4)},
    **{ACPI_PM_PORT + 4 + i: "ACPI PM1a control" for i in range(2)},
    **{ACPI_PM_PORT + 8 + i: "ACPI PM timer" for i in range(4)},
    0x20: "PIC master", 0x21: "PIC master", 0xA0: "PIC slave", 0xA1: "PIC slave",
    **{0x40 + i: "PIT" for i in range(4)}, 0x61: "speaker/PIT gate",
}  # fmt: skip
