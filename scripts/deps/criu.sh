#!/usr/bin/env bash
# A working CRIU (>= 4.1) at /usr/local/sbin/criu, for runc checkpoint/restore.
#
# Debian bookworm's criu 3.17 (/usr/sbin/criu) fails on recent kernels ("Unexpected rt
# vDSO area bounds", fixed in 4.1), so this builds CRIU from Debian trixie's source
# package (see /work/shared/PLATFORM.md, "Checkpoint / restore (CRIU)"):
#   - a separate sources list naming trixie deb-src on the mirror apt already uses, and
#     separate apt lists/cache dirs: the system's own apt state is never touched;
#   - `apt-get source --download-only criu` (only the upstream tarball is needed);
#   - the build deps (+ iptables, which runc needs for checkpoints), `make -j2 criu`.
# The binary is cached in /var/cache/fleetvisor/criu-<version>/criu, so a second run
# only copies it; a run finding a working >= 4.1 at /usr/local/sbin/criu does nothing.
#
# Idempotent. Quiet on success (one line). Never fails the caller: when not root or
# when the build fails it says why and exits 0 (tests that need CRIU skip with a reason).
set -uo pipefail

TARGET=/usr/local/sbin/criu
CACHE_ROOT=/var/cache/fleetvisor
MIN_VERSION=4.1
SUITE=trixie
BUILD_DEPS=(
    libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev libnl-3-dev
    libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler protobuf-compiler uuid-dev
    python3-protobuf
    # tools the build needs and runc's checkpoint needs
    gcc make pkg-config iptables
)

say() { echo "criu.sh: $*" >&2; }

# The version a criu binary reports ("Version: 4.1.1"), empty when it does not run.
criu_version() {
    [ -x "$1" ] || return 0
    timeout 20 "$1" --version 2>/dev/null | sed -n 's/^Version: *\([0-9][0-9.]*\).*/\1/p' | head -1
}

at_least_min() { [ -n "$1" ] && dpkg --compare-versions "$1" ge "$MIN_VERSION"; }

have_iptables() { command -v iptables >/dev/null 2>&1 || [ -x /usr/sbin/iptables ]; }

# 1. Already there and working: nothing to do.
version="$(criu_version "$TARGET")"
if at_least_min "$version" && have_iptables; then
    echo "criu $version at $TARGET"
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    what="criu >= $MIN_VERSION at $TARGET"
    have_iptables || what="$what, iptables"
    say "not root; missing $what (run scripts/deps/criu.sh as root; checkpoint tests skip)"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
LOCK_WAIT=(-o DPkg::Lock::Timeout=600) # other apt runs (system-deps.sh) may hold the lock

install_packages() { # only what is not installed yet
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
            missing+=("$pkg")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    if ! apt-get "${LOCK_WAIT[@]}" install -y -qq --no-install-recommends "${missing[@]}" \
        >/dev/null 2>&1; then
        apt-get "${LOCK_WAIT[@]}" update -qq >/dev/null 2>&1
        apt-get "${LOCK_WAIT[@]}" install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
            { say "could not install ${missing[*]}"; return 1; }
    fi
}

install_binary() { # $1 = a built criu
    install -D -m 0755 "$1" "$TARGET.fv-new.$$" && mv -f "$TARGET.fv-new.$$" "$TARGET"
}

# 2. Built before: copy the cached binary (and make sure its shared libraries exist).
cached=""
for candidate in $(ls -d "$CACHE_ROOT"/criu-*/criu 2>/dev/null | sort -V -r); do
    if at_least_min "$(criu_version "$candidate")"; then cached="$candidate"; break; fi
done
if [ -z "$cached" ]; then
    # a cached binary whose libraries are missing reports nothing: reinstall the deps
    for candidate in $(ls -d "$CACHE_ROOT"/criu-*/criu 2>/dev/null | sort -V -r); do
        install_packages "${BUILD_DEPS[@]}" || break
        if at_least_min "$(criu_version "$candidate")"; then cached="$candidate"; break; fi
    done
fi
if [ -n "$cached" ]; then
    have_iptables || install_packages iptables || { say "iptables missing"; exit 0; }
    if install_binary "$cached"; then
        echo "criu $(criu_version "$TARGET") at $TARGET (from $cached)"
    else
        say "could not copy $cached to $TARGET"
    fi
    exit 0
fi

# 3. Build it.
work="$(mktemp -d /tmp/fv-criu-build.XXXXXXXX)" || { say "mktemp failed"; exit 0; }
trap 'rm -rf "$work"' EXIT

fail() { say "build failed: $*"; [ -s "$work/log" ] && tail -n 15 "$work/log" >&2; exit 0; }

# The mirror apt already uses for the Debian archive (one-line lists and deb822 files).
find_mirror() {
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -r "$f" ] || continue
        sed -e 's/#.*//' -e 's/\[[^]]*\]//g' "$f" | awk '$1 == "deb" && $3 ~ /^(bookworm|trixie|stable|testing)(-updates)?$/ { print $2 }'
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -r "$f" ] || continue
        awk -v RS= '
            /(^|\n)[Ee]nabled:[ \t]*no/ { next }
            /(^|\n)Types:[^\n]*deb([ \t]|\n|$)/ && /(^|\n)Suites:[^\n]*(bookworm|trixie|stable|testing)([ \t]|\n|$)/ {
                n = split($0, lines, "\n")
                for (i = 1; i <= n; i++) if (lines[i] ~ /^URIs:/) {
                    sub(/^URIs:[ \t]*/, "", lines[i]); split(lines[i], u, /[ \t]+/); print u[1]
                }
            }' "$f"
    done
}
mirror="$(find_mirror | grep -v -- '-security' | head -1)"
[ -n "$mirror" ] || mirror="http://deb.debian.org/debian"

install_packages "${BUILD_DEPS[@]}" || fail "build dependencies (see above)"

list="$work/trixie-src.list"
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror $SUITE main" >"$list"
mkdir -p "$work/lists/partial" "$work/apt-cache/archives/partial" "$work/src"
apt_opts=(
    -o "Dir::Etc::SourceList=$list" -o "Dir::Etc::SourceParts=/dev/null"
    -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/apt-cache"
    -o "Dir::Cache::pkgcache=" -o "Dir::Cache::srcpkgcache="
)
apt-get "${apt_opts[@]}" update >"$work/log" 2>&1 || fail "apt-get update of $SUITE deb-src from $mirror"
# only the upstream tarball is needed; the Debian packaging part may fail to download
(cd "$work/src" && apt-get "${apt_opts[@]}" source --download-only criu) >>"$work/log" 2>&1
tarball="$(ls "$work"/src/criu_*.orig.tar.* 2>/dev/null | head -1)"
[ -n "$tarball" ] || fail "apt-get source --download-only criu brought no criu_*.orig.tar.*"
version="$(basename "$tarball" | sed -n 's/^criu_\([0-9][0-9.]*\)\.orig\.tar\..*/\1/p')"
at_least_min "$version" || fail "$SUITE has criu $version, older than $MIN_VERSION"

mkdir -p "$work/tree"
tar -xf "$tarball" -C "$work/tree" --strip-components=1 >>"$work/log" 2>&1 || fail "unpacking $tarball"
make -C "$work/tree" -j2 criu >>"$work/log" 2>&1 || fail "make -j2 criu (criu $version)"
built="$work/tree/criu/criu"
at_least_min "$(criu_version "$built")" || fail "the built $built does not report version >= $MIN_VERSION"

mkdir -p "$CACHE_ROOT/criu-$version" || fail "mkdir $CACHE_ROOT/criu-$version"
install -m 0755 "$built" "$CACHE_ROOT/criu-$version/criu.fv-new.$$" &&
    mv -f "$CACHE_ROOT/criu-$version/criu.fv-new.$$" "$CACHE_ROOT/criu-$version/criu" ||
    fail "caching the binary in $CACHE_ROOT/criu-$version"
install_binary "$built" || fail "copying to $TARGET"
echo "criu $(criu_version "$TARGET") at $TARGET (built from $SUITE source)"
exit 0
