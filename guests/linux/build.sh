#!/usr/bin/env bash
# Fetch Debian's packages and build the kernels the slow Linux tests boot.
# Packages are downloaded (apt-get download) and unpacked (dpkg-deb -x), never
# installed. Everything lands in guests/linux/cache/ (git-ignored) and is reused.
#
# Results in guests/linux/cache/out/:
#   tiny-bzImage      tiny 6.1 kernel, Linux boot protocol
#   tiny-pvh.elf      the same kernel's stripped vmlinux (PVH entry note)
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

# The tiny kernel.
src="$cache/src"
if [ ! -e "$out/tiny-bzImage" ] || [ "$here/tiny.config" -nt "$out/tiny-bzImage" ]; then
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
    make -C "$src" -s tinyconfig
    (cd "$src" && scripts/kconfig/merge_config.sh -m .config "$here/tiny.config" >/dev/null)
    make -C "$src" -s olddefconfig
    make -C "$src" -s -j"${JOBS:-2}" bzImage
    cp "$src/arch/x86/boot/bzImage" "$out/tiny-bzImage.tmp"
    strip -o "$out/tiny-pvh.elf" "$src/vmlinux"
    mv "$out/tiny-bzImage.tmp" "$out/tiny-bzImage"
fi
ls -l "$out"
