"""virtio 1.2 over virtio-mmio: split virtqueues, the transport, and the devices."""
