#!/usr/bin/env bash
# Fetch Debian's packages and build the kernels the slow Linux tests boot.
# Packages are downloaded (apt-get download) and unpacked (dpkg-deb -x), never
# installed. Everything lands in guests/linux/cache/ (git-ignored) and is reused.
#
# Results in guests/linux/cache/out/:
#   tiny-bzImage      tiny 6.1 kernel, Linux boot protocol
#   tiny-pvh.elf      the same kernel's stripped vmlinux (PVH entry note)
#   tiny-acpi-bzImage the tiny kernel with ACPI and PCI (acpi.config)
#   tiny-acpi-pvh.elf its stripped vmlinux
#   initramfs.cpio    BusyBox initramfs (uncompressed: gzip costs ~20 s here)
#   cloud-vmlinuz     Debian's stock cloud kernel (bzImage)
#   memtest86+x64.bin Debian's memtest86+ (Linux boot protocol image)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cache="$here/cache"
debs="$cache/debs"
root="$cache/root"
out="$cache/out"
mkdir -p "$debs" "$root" "$out"

# Which concrete package a Debian metapackage points at (the first Depends).
resolve() {
    apt-cache depends "$1" | awk '/Depends:/ {print $2; exit}'
}

fetch() {
    local pkg="$1"
    if ! ls "$debs/${pkg}_"*.deb >/dev/null 2>&1; then
        (cd "$debs" && apt-get download "$pkg")
    fi
    local deb
    deb="$(ls "$debs/${pkg}_"*.deb | tail -1)"
    if [ ! -e "$root/.$pkg.done" ]; then
        dpkg-deb -x "$deb" "$root"
        touch "$root/.$pkg.done"
    fi
}

cloud_pkg="$(resolve linux-image-cloud-amd64)"
case "$cloud_pkg" in linux-image-*-cloud-amd64) ;; *) cloud_pkg=linux-image-cloud-amd64 ;; esac
for pkg in linux-source-6.1 busybox-static "$cloud_pkg" memtest86+; do
    fetch "$pkg"
done

# Debian's stock cloud kernel and memtest86+, as shipped.
cp "$(ls "$root"/boot/vmlinuz-*-cloud-amd64 | tail -1)" "$out/cloud-vmlinuz"
cp "$root/boot/memtest86+x64.bin" "$out/memtest86+x64.bin"

# BusyBox initramfs.
python3 "$here/mkinitramfs.py" "$root/bin/busybox" "$out/initramfs.cpio"

# The tiny kernels, from one unpacked source tree, each built in its own
# directory (make O=...), so that both stay built and rebuild incrementally.
src="$cache/src"
if [ ! -d "$src" ]; then
    mkdir -p "$src.tmp"
    tar -xf "$(ls "$root"/usr/src/linux-source-6.1.tar.* | tail -1)" -C "$src.tmp" --strip-components=1
    # PVM hosts cannot run int3 at CPL0, and the kernel's int3 self-test runs
    # unconditionally during boot: skip that one call.
    sed -i 's/^\tint3_selftest();$/\tif (0) int3_selftest(); \/* kvmpy: no CPL0 int3 on PVM hosts *\//' \
        "$src.tmp/arch/x86/kernel/alternative.c"
    grep -q 'if (0) int3_selftest();' "$src.tmp/arch/x86/kernel/alternative.c"
    mv "$src.tmp" "$src"
fi
# Caches from before the O= builds hold an in-tree build, which make O= refuses.
if [ -e "$src/.config" ]; then
    make -C "$src" -s mrproper
fi

# build_kernel NAME FRAGMENT...: `make tinyconfig` with the fragments merged
# over it, to $out/NAME-bzImage (and the stripped vmlinux, for PVH, to
# $out/NAME-pvh.elf); rebuilt when a fragment is newer than the image.
build_kernel() {
    local name="$1"
    shift
    local image="$out/$name-bzImage" fragment stale=0
    [ -e "$image" ] || stale=1
    for fragment in "$@"; do
        if [ "$fragment" -nt "$image" ]; then stale=1; fi
    done
    [ "$stale" = 1 ] || return 0
    local obj="$cache/build-$name"
    local started=$SECONDS
    mkdir -p "$obj"
    make -C "$src" O="$obj" -s tinyconfig
    (cd "$src" && scripts/kconfig/merge_config.sh -m -O "$obj" "$obj/.config" "$@" >/dev/null)
    make -C "$src" O="$obj" -s olddefconfig
    make -C "$src" O="$obj" -s -j"${JOBS:-2}" bzImage
    strip -o "$out/$name-pvh.elf" "$obj/vmlinux"
    cp "$obj/arch/x86/boot/bzImage" "$image.tmp"
    mv "$image.tmp" "$image"
    echo "built $name in $((SECONDS - started)) s"
}

build_kernel tiny "$here/tiny.config"
# The same with ACPI and PCI, for the platform test (tests/linux/test_acpi_pci.py).
build_kernel tiny-acpi "$here/tiny.config" "$here/acpi.config"

ls -l "$out"
