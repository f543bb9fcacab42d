#!/usr/bin/env bash
# Installs everything the QEMU scripts and the end-to-end guest test need.
#
# Idempotent and non-interactive; run as root. It adds the bookworm-backports
# suite for the Debian mirror already configured in
# /etc/apt/sources.list.d/debian.sources (same URIs and Signed-By), because
# Debian 12's own qemu-system-x86 (7.2) conflicts with the qemu-utils 10.0 from
# backports (both ship qemu-storage-daemon): QEMU must come from backports.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
    echo "install-deps.sh: must run as root" >&2
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
# Other processes (or workers) may hold the dpkg lock: wait for it instead of failing.
APT=(apt-get -y -q -o DPkg::Lock::Timeout=900 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

SOURCES=/etc/apt/sources.list.d/debian.sources
BACKPORTS=/etc/apt/sources.list.d/vblkcache-bookworm-backports.sources

have_backports() {
    grep -rqsE '(^|[[:space:]])bookworm-backports([[:space:]]|$)' /etc/apt/sources.list /etc/apt/sources.list.d/
}

if ! have_backports; then
    uris=""
    signed_by=""
    if [[ -r $SOURCES ]]; then
        # deb822: stanzas separated by blank lines; '#' lines are comments (the
        # snapshot mirror hints live there and are kept out of the URIs). Take
        # the stanza whose Suites field names plain "bookworm".
        read -r uris signed_by < <(awk '
            function flush() {
                if (is_main && u != "") { print u, (s == "" ? "-" : s); done = 1; exit }
                u = ""; s = ""; is_main = 0
            }
            /^[[:space:]]*#/ { next }
            /^[[:space:]]*$/ { flush(); next }
            tolower($1) == "uris:" { u = $2 }
            tolower($1) == "signed-by:" { s = $2 }
            tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == "bookworm") is_main = 1 }
            END { if (!done) flush() }
        ' "$SOURCES") || true
    fi
    if [[ -z $uris ]]; then
        # Fall back to a one-line sources.list entry for bookworm.
        uris=$(awk '$1 == "deb" && $3 == "bookworm" { print $2; exit }' /etc/apt/sources.list 2>/dev/null || true)
        signed_by=/usr/share/keyrings/debian-archive-keyring.gpg
    fi
    if [[ -z $uris ]]; then
        echo "install-deps.sh: no bookworm mirror found in $SOURCES or /etc/apt/sources.list" >&2
        exit 1
    fi
    {
        echo "Types: deb"
        echo "URIs: $uris"
        echo "Suites: bookworm-backports"
        echo "Components: main"
        if [[ $signed_by != "-" && -n $signed_by ]]; then
            echo "Signed-By: $signed_by"
        fi
    } >"$BACKPORTS.tmp"
    mv "$BACKPORTS.tmp" "$BACKPORTS"
    echo "install-deps.sh: added $BACKPORTS (URIs: $uris)"
    "${APT[@]}" update
elif [[ $(apt-cache policy qemu-system-x86 2>/dev/null) != *bookworm-backports* ]]; then
    # (Captured, not piped into grep -q: with pipefail an early grep exit
    # would SIGPIPE apt-cache and read as "not found".)
    "${APT[@]}" update
fi

# From backports: QEMU itself; qboot.rom is in qemu-system-data, which
# qemu-system-x86 pulls in (named here so a missing firmware is reinstalled).
BPO_PKGS=(qemu-system-x86 qemu-system-data qemu-utils)
# From the configured default suites: guest building, guest tests, nbdkit
# (used by other parts of the project) and losetup (`mount`: the tests of
# block device sources run on loop devices).
PKGS=(busybox-static fio e2fsprogs cpio xz-utils zstd kmod file binutils nbdkit mount)

missing_of() {
    local p
    for p in "$@"; do
        if [[ $(dpkg-query -W -f='${Status}' "$p" 2>/dev/null) != "install ok installed" ]]; then
            echo "$p"
        fi
    done
}

# Installs packages; on failure refreshes the lists once (a stale list is the
# usual cause) and retries.
install_pkgs() {
    if ! "${APT[@]}" install --no-install-recommends "$@"; then
        "${APT[@]}" update
        "${APT[@]}" install --no-install-recommends "$@"
    fi
}

# Backports for QEMU only (`-t` would otherwise upgrade unrelated packages).
if [[ -n $(missing_of "${BPO_PKGS[@]}") ]] ||
    [[ $(dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null) != *bpo* ]]; then
    install_pkgs -t bookworm-backports "${BPO_PKGS[@]}"
fi
mapfile -t missing < <(missing_of "${PKGS[@]}")
if ((${#missing[@]} > 0)); then
    install_pkgs "${missing[@]}"
fi

for f in /usr/bin/qemu-system-x86_64 /usr/bin/qemu-storage-daemon /usr/bin/qemu-img \
    /usr/share/qemu/qboot.rom /usr/bin/fio /sbin/mkfs.ext4 /bin/busybox /usr/bin/nbdkit; do
    if [[ ! -e $f ]]; then
        echo "install-deps.sh: $f is still missing after install" >&2
        exit 1
    fi
done
echo "install-deps.sh: ok ($(qemu-system-x86_64 --version | head -n1))"
