"""How ISA interrupts reach the in-kernel PIC and IOAPIC: QEMU's PC wiring.

Guests written for QEMU expect the PIT (IRQ 0) on IOAPIC pin 2 (the firmware tables
carry that override), every other ISA IRQ n on pin n, and pins 16-23 free.
:func:`gsi_routes` is the routing table QEMU installs on KVM (``kvm_pc_setup_irq_routing``).
"""

from __future__ import annotations

import enum


class Irqchip(enum.IntEnum):
    """KVM's interrupt controller ids (``KVM_IRQCHIP_*`` in <linux/kvm.h>, part of its ABI)."""

    PIC_MASTER = 0
    PIC_SLAVE = 1
    IOAPIC = 2


ISA_IRQS = 16
IOAPIC_PINS = 24
PIC_CASCADE_IRQ = 2  # the slave 8259 hangs off master input 2
PIT_IRQ = 0
PIT_IOAPIC_PIN = 2
COM1_IRQ = 4
RTC_IRQ = 8
ACPI_SCI_IRQ = 9
PIC_INPUTS = 8
# Where a PC BIOS leaves the PICs' interrupt vectors, and where struct kvm_pic_state keeps
# the vector base (the byte after last_irr, irr, imr, isr and priority_add).
BIOS_IRQ0_VECTOR = 0x08
BIOS_IRQ8_VECTOR = 0x70
PIC_IRQ_BASE_OFFSET = 5
# ISA IRQs no legacy device of this machine uses, handed to virtio-mmio devices in order
# (edge-triggered, as Firecracker's; the kernel learns them from virtio_mmio.device=).
VIRTIO_IRQS = (5, 6, 7, 10, 11, 12, 14, 15)


def gsi_routes() -> list[tuple[int, Irqchip, int]]:
    """``(gsi, irqchip, pin)`` for every GSI: ISA IRQs to both 8259s and the IOAPIC, the rest to the IOAPIC."""
    routes = []
    for irq in range(ISA_IRQS):
        if irq == PIC_CASCADE_IRQ:
            continue
        chip = Irqchip.PIC_MASTER if irq < PIC_INPUTS else Irqchip.PIC_SLAVE
        routes.append((irq, chip, irq % PIC_INPUTS))
    for gsi in range(IOAPIC_PINS):
        if gsi == PIC_CASCADE_IRQ:
            continue
        routes.append((gsi, Irqchip.IOAPIC, PIT_IOAPIC_PIN if gsi == PIT_IRQ else gsi))
    return routes
