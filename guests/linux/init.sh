#!/bin/sh
# /init of pykvm's Linux test guest (busybox sh): say the guest reached user space, then power off.
/bin/busybox mount -t proc proc /proc 2>/dev/null
echo "pykvm linux guest: kernel $(/bin/busybox uname -r), init pid $$"
echo PYKVM-LINUX-GUEST-OK
/bin/busybox poweroff -f
