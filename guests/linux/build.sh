#!/usr/bin/env bash
# Build pykvm's Linux test guest from Debian packages, into guests/linux/build/ (git-ignored):
#
#   bzImage             the kernel of Debian's current linux-image-<version>-amd64 package
#   vmlinux             the ELF kernel inside that bzImage (for PVH boot), see extract_vmlinux.py
#   initramfs.cpio.gz   busybox-static, and /init (init.sh): prints PYKVM-LINUX-GUEST-OK, powers off
#   VERSION             the Debian package versions used
#
# Packages are fetched with `apt-get download` and unpacked with `dpkg -x`: nothing is installed.
# A second run does nothing; `rm -rf guests/linux/build` starts over.  The apt package lists must
# be there (`apt-get update`); when they are missing, or too old for the mirror to have what they
# name, this script runs apt-get update itself: as root, through sudo, or it stops and says so.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
build="$here/build"
python=${PYTHON:-python3}
outputs=("$build/bzImage" "$build/vmlinux" "$build/initramfs.cpio.gz")

say() { echo "linux-guest: $*"; }
# apt shows download progress on a terminal; in a CI log (no terminal) it stays quiet (-q).
progress=(-q)
[ -t 2 ] && progress=()
die() { echo "linux-guest: error: $*" >&2; exit 1; }

built=yes
for output in "${outputs[@]}"; do [ -s "$output" ] || built=no; done
if [ "$built" = yes ]; then
    say "already built in $build ($(tr '\n' ' ' < "$build/VERSION"))"
    exit 0
fi

for tool in apt-get apt-cache dpkg "$python"; do
    command -v "$tool" > /dev/null || die "$tool is missing (this needs a Debian or Ubuntu host)"
done

as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    elif command -v sudo > /dev/null; then
        sudo "$@"
    else
        die "'$*' needs root: run it as root (or install sudo), then run this again"
    fi
}

candidate() { apt-cache policy "$1" 2> /dev/null | awk '/Candidate:/ { print $2 }'; }

if [ -z "$(candidate linux-image-amd64)" ] || [ "$(candidate linux-image-amd64)" = "(none)" ]; then
    say "the apt package lists do not know linux-image-amd64: running apt-get update"
    as_root apt-get update
fi

# linux-image-amd64 is a meta package: it depends on the versioned kernel package of its
# candidate version (linux-image-6.1.0-56-amd64, say).  That one is the real, signed image; the
# -unsigned and -dbg variants are other packages.
kernel_package_name() {
    local package
    package=$(apt-cache depends linux-image-amd64 \
        | awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9].*-amd64$/ { print $2; exit }')
    [ -n "$package" ] || die "cannot tell which kernel package linux-image-amd64 depends on (apt-cache depends linux-image-amd64)"
    case "$package" in
        *-unsigned | *-dbg) die "linux-image-amd64 resolved to $package, which is not a bootable image package" ;;
    esac
    echo "$package"
}

download() {  # package -> the .deb's path, downloaded into build/debs once; fails if apt cannot
    local package=$1 version deb options=()
    version=$(candidate "$package")
    [ -n "$version" ] && [ "$version" != "(none)" ] || die "apt knows no candidate version of $package"
    deb=$(find "$build/debs" -maxdepth 1 -name "${package}_${version//:/%3a}_*.deb" | head -n 1)
    if [ -z "$deb" ]; then
        say "downloading $package $version" >&2
        # As root, apt downloads as the _apt user, who cannot write here: keep root for this.
        [ "$(id -u)" -eq 0 ] && options=(-o APT::Sandbox::User=root)
        (cd "$build/debs" && apt-get download ${progress[@]+"${progress[@]}"} ${options[@]+"${options[@]}"} "$package=$version" >&2) || return 1
        deb=$(find "$build/debs" -maxdepth 1 -name "${package}_${version//:/%3a}_*.deb" | head -n 1)
        [ -n "$deb" ] || die "apt-get download $package=$version left no .deb in $build/debs"
    fi
    echo "$deb"
}

fetch() {  # sets kernel_package, kernel_deb, busybox_deb
    kernel_package=$(kernel_package_name) || return 1
    kernel_deb=$(download "$kernel_package") || return 1
    busybox_deb=$(download busybox-static) || return 1
}

mkdir -p "$build/debs"
work=$(mktemp -d "$build/unpack.XXXXXX")
trap 'rm -rf "$work"' EXIT

if ! fetch; then
    # Package lists older than the mirror name versions it no longer has.
    say "downloading failed: updating the apt package lists and trying again"
    as_root apt-get update
    fetch || die "cannot download the packages (see apt's messages above)"
fi

say "unpacking $(basename "$kernel_deb")"
dpkg -x "$kernel_deb" "$work/kernel"
vmlinuz=$(find "$work/kernel/boot" -maxdepth 1 -name 'vmlinuz-*' | head -n 1)
[ -n "$vmlinuz" ] || die "$(basename "$kernel_deb") has no boot/vmlinuz-*"
cp "$vmlinuz" "$build/bzImage.tmp" && mv "$build/bzImage.tmp" "$build/bzImage"

say "extracting vmlinux from the bzImage"
"$python" "$here/extract_vmlinux.py" "$build/bzImage" "$build/vmlinux"

say "unpacking $(basename "$busybox_deb")"
dpkg -x "$busybox_deb" "$work/busybox"
[ -x "$work/busybox/bin/busybox" ] || die "$(basename "$busybox_deb") has no bin/busybox"

say "writing the initramfs"
"$python" "$here/mkinitramfs.py" --busybox "$work/busybox/bin/busybox" --init "$here/init.sh" \
    --output "$build/initramfs.cpio.gz"

printf '%s %s\nbusybox-static %s\n' "$kernel_package" "$(candidate "$kernel_package")" \
    "$(candidate busybox-static)" > "$build/VERSION"
say "done: $(tr '\n' ' ' < "$build/VERSION")in $build"
