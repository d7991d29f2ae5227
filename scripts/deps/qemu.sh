#!/usr/bin/env bash
# QEMU for the VM driver, and Debian's cloud kernel for VM images, cached once per host.
#
#   qemu-system-x86, qemu-utils        installed only if missing
#   /var/cache/fleetvisor/vm-kernel/   <kernel release>/vmlinuz, modules/*.ko (virtio,
#                                      block, net, console), modules.order, modules.dep
#                                      (NAME.ko: DEPS.ko), and `current`
#                                      -> <kernel release>; image builds read it offline
#
# Idempotent; as non-root it says what is missing and exits 0 (tests that need QEMU skip).
# FLEETVISOR_VM_KERNEL_CACHE overrides the cache dir.
set -euo pipefail
cache="${FLEETVISOR_VM_KERNEL_CACHE:-/var/cache/fleetvisor/vm-kernel}"
say() { echo "deps/qemu: $*" >&2; }

missing=()
command -v qemu-system-x86_64 >/dev/null 2>&1 || missing+=(qemu-system-x86)
command -v qemu-img >/dev/null 2>&1 || missing+=(qemu-utils)
have_kernel=no
[ -f "$cache/current/vmlinuz" ] && [ -f "$cache/current/.done" ] && have_kernel=yes
if [ "${#missing[@]}" -eq 0 ] && [ "$have_kernel" = yes ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    say "not root; missing: ${missing[*]:-} $([ $have_kernel = no ] && echo "cloud kernel in $cache")"
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
updated=no
apt_update() { [ "$updated" = yes ] || { apt-get update -qq >/dev/null; updated=yes; }; }
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    apt_update
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ "$have_kernel" = yes ] && exit 0

# The versioned package the cloud metapackage points at, e.g. linux-image-6.1.0-41-cloud-amd64.
kernel_package() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '/Depends: linux-image-[0-9].*-cloud-amd64/ {print $2; exit}'
}
pkg="$(kernel_package)"
if [ -z "$pkg" ]; then
    apt_update
    pkg="$(kernel_package)"
fi
[ -n "$pkg" ] || { say "apt offers no linux-image-*-cloud-amd64"; exit 1; }

work="$(mktemp -d /tmp/fv-vmkernel-XXXXXX)"
trap 'rm -rf "$work"' EXIT
say "fetching $pkg"
(cd "$work" && apt-get -o APT::Sandbox::User=root download -qq "$pkg" >/dev/null)
dpkg -x "$work"/*.deb "$work/root"
release="$(basename "$(ls -d "$work"/root/lib/modules/*)")"
mods="$work/root/lib/modules/$release"
out="$cache/.$release.build-$$"
rm -rf "$out"
mkdir -p "$out/modules"
cp "$work/root/boot/vmlinuz-$release" "$out/vmlinuz"
# Just what a virtio guest needs; modules.order keeps the kernel's dependency order.
wanted='/(virtio/|block/virtio_blk|net/virtio_net|net/net_failover|net/core/failover|char/virtio_console|char/hw_random/virtio-rng|char/hw_random/rng-core)'
grep -E "$wanted" "$mods/modules.order" | while read -r rel; do
    src="$mods/$rel"
    for candidate in "$src" "$src.xz" "$src.zst"; do
        [ -f "$candidate" ] || continue
        name="$(basename "$rel")"
        case "$candidate" in
            *.xz) xz -dc "$candidate" >"$out/modules/$name" ;;
            *.zst) zstd -qdc "$candidate" >"$out/modules/$name" ;;
            *) cp "$candidate" "$out/modules/$name" ;;
        esac
        echo "$name" >>"$out/modules.order"
    done
done
# modules.dep is made by depmod at install time, not shipped: take each module's own
# `depends=` field instead (NAME.ko: DEP.ko ...).
for ko in "$out"/modules/*.ko; do
    deps="$(grep -a -o 'depends=[A-Za-z0-9_,-]*' "$ko" | head -n1 | cut -d= -f2 | tr ',' ' ')"
    echo "$(basename "$ko"):$(for d in $deps; do printf ' %s.ko' "$d"; done)" >>"$out/modules.dep"
done
echo "$pkg" >"$out/package"
touch "$out/.done"
rm -rf "${cache:?}/$release"
mv "$out" "$cache/$release"
ln -sfn "$release" "$cache/current"
say "kernel $release cached in $cache/$release ($(ls "$cache/$release/modules" | wc -l) modules)"
