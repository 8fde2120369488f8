"""x86 CPU state for the guest: modes, descriptor tables, page tables, CPUID, MSRs, memory map."""
