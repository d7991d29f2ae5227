#!/usr/bin/env bash
# Debian packages the real drivers and their tests need. Idempotent: installs only
# what is missing, and only as root (elsewhere it says what is missing and goes on;
# the tests that need a part skip with the reason).
set -uo pipefail
want=(
    "runc:runc"
    "busybox-static:busybox"
    "skopeo:skopeo"
    "iptables:iptables"
    "debootstrap:debootstrap"
    "iproute2:ip"
    "swtpm:swtpm"
    "tpm2-tools:tpm2_quote"
    "gcc:gcc"
    "libc6-dev:/usr/include/stdio.h"
)
missing=()
for item in "${want[@]}"; do
    pkg="${item%%:*}" cmd="${item##*:}"
    case "$cmd" in
        /*) [ -e "$cmd" ] || missing+=("$pkg"); continue ;; # a file the package ships
    esac
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || [ -x "/bin/$cmd" ] || missing+=("$pkg")
done
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "system-deps: not root; missing ${missing[*]} (tests that need them will skip)" >&2
    else
        echo "system-deps: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq >/dev/null
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    fi
fi
# Parts that need more than a package: each script is idempotent and caches its work.
"$here/deps/criu.sh"   # CRIU >= 4.1 (live migration): Debian 12's 3.17 fails on new kernels
"$here/deps/qemu.sh"   # QEMU + a cached Debian cloud kernel for VM images (drivers/qemu)
