#!/usr/bin/env bash
# Build and install EPICS base's Channel Access command-line tools (caget, caput, camonitor,
# cainfo) for labctl's conformance tests.
#
#   bash scripts/install-epics-base.sh        (as root; idempotent, exits at once when installed)
#
# Where it comes from: Debian's archive carries EPICS base as the source package `epics-base`.
# bookworm has no such package, and trixie's binary packages need a newer glibc (2.38) than
# bookworm's (2.36), so the source is taken from the trixie suite and built here. Only what the
# tools need is built: libCom, the CA client library libca, and the tools themselves (no IOC
# database, no pvAccess), in about a minute.
#
# Only *source* comes from trixie, and the system's apt configuration is never touched:
# the deb-src line for trixie is written to a separate sources file inside the temporary
# build directory, and `apt-get update`/`apt-get source --print-uris` are pointed at that file
# and at a private lists/cache directory (-o Dir::Etc::SourceParts=... -o Dir::State::Lists=...).
# A deb-src entry cannot provide binary packages, so nothing can be installed from trixie,
# and the machine's own `apt-get update` does not start fetching trixie indexes.
# Everything that is installed (compiler, make, perl) comes from the machine's configured
# bookworm sources.
#
# The source tarballs (.orig and .debian) are fetched with apt's own downloader
# (`apt-helper download-file URI FILE SHA256:...`), each checked against the SHA-256 that the
# signed Sources index lists; the .dsc is not needed (and the archive may not serve it), so
# the tarballs are unpacked and Debian's patches (debian/patches/series) applied here.
#
# Version: trixie has epics-base 7.0.8.1+dfsg1-7+deb13u1 (EPICS 7.0.8.1, CA protocol 4.13;
# verified 2025: builds cleanly on bookworm with its gcc 12 and perl 5.36). Should a future
# trixie update fail to build, pin the last good version, e.g.
#   LABCTL_EPICS_VERSION=7.0.8.1+dfsg1-7+deb13u1 bash scripts/install-epics-base.sh
# (any version still in the chosen suite can be fetched) or pick another suite with
# LABCTL_EPICS_SUITE=sid.
#
# Build: `make configure src` (the build tools), then modules/libcom/src, modules/ca/src/client
# and modules/ca/src/tools, with COMMANDLINE_LIBRARY=EPICS (no readline) and
# LINKER_USE_RPATH=ORIGIN: the tools find libca and libCom relative to their own location,
# so they run without LD_LIBRARY_PATH. Installed (and nothing else):
#   $PREFIX/bin/<arch>/{caget,caput,camonitor,cainfo}   the tools
#   $PREFIX/lib/<arch>/libca.so.*, libCom.so.*          their libraries
#   $PREFIX/bin/{caget,caput,camonitor,cainfo}          links to the tools
#   $PREFIX/VERSION                                     the Debian source version built
# caRepeater is deliberately not installed: libca starts one when it finds it on PATH, and
# the tests keep it off PATH (each test pins its own ports).
#
# Environment:
#   LABCTL_EPICS_PREFIX   where to install (default /usr/local/lib/labctl-epics; the tests look
#                         there, or wherever this variable points)
#   LABCTL_EPICS_SUITE    Debian suite to take the source from (default trixie)
#   LABCTL_EPICS_VERSION  exact Debian source version (default: the suite's current one)
#   LABCTL_EPICS_MIRROR   Debian mirror (default http://deb.debian.org/debian)
#   LABCTL_EPICS_JOBS     parallel build jobs (default 2)
#   LABCTL_EPICS_APT_OPTS extra options for the private apt-get calls, e.g. for sid/testing on a
#                         snapshot mirror or a machine with a skewed clock (their Release files
#                         expire after a week; stable suites like trixie do not):
#                         LABCTL_EPICS_APT_OPTS="-o Acquire::Check-Valid-Until=false"
#   LABCTL_APT_UPDATED=1  `apt-get update` already ran in this run (set by install-test-deps.sh)
set -euo pipefail

PREFIX="${LABCTL_EPICS_PREFIX:-/usr/local/lib/labctl-epics}"
EPICS_SUITE="${LABCTL_EPICS_SUITE:-trixie}"
EPICS_VERSION="${LABCTL_EPICS_VERSION:-}"
EPICS_MIRROR="${LABCTL_EPICS_MIRROR:-http://deb.debian.org/debian}"
JOBS="${LABCTL_EPICS_JOBS:-2}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
APT_HELPER=/usr/lib/apt/apt-helper
TOOLS=(caget caput camonitor cainfo)

log() { printf '[install-epics-base] %s\n' "$*" >&2; }
die() { printf '[install-epics-base] ERROR: %s\n' "$*" >&2; exit 1; }

tools_work() {  # the four tools are installed and start (their libraries found)
    local t
    for t in "${TOOLS[@]}"; do
        [ -x "$PREFIX/bin/$t" ] || return 1
    done
    "$PREFIX/bin/caget" -V >/dev/null 2>&1
}

# --- quick exit when already installed -------------------------------------------------
if tools_work; then
    log "EPICS CA tools already installed in $PREFIX ($(cat "$PREFIX/VERSION" 2>/dev/null || echo 'version unknown')); nothing to do."
    exit 0
fi

# --- from here on we install: need root --------------------------------------------------
if [ "$(id -u)" -ne 0 ]; then
    die "EPICS CA tools are not installed in $PREFIX and installing them needs root. Run:
    sudo bash $(realpath "$0")"
fi
export DEBIAN_FRONTEND=noninteractive
APT_GET=(apt-get -y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)

missing_packages() {  # prints the given packages that are not installed
    local p
    for p in "$@"; do
        dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null | grep -qx installed || printf '%s\n' "$p"
    done
}

apt_update_once() {
    if [ "${LABCTL_APT_UPDATED:-}" != 1 ]; then
        log "apt-get update"
        "${APT_GET[@]}" update || die "apt-get update failed (is the Debian archive reachable?)"
        export LABCTL_APT_UPDATED=1
    fi
}

# --- build dependencies (all from the machine's bookworm sources) -----------------------
BUILD_DEPS=(make gcc g++ libc6-dev perl patch xz-utils)
mapfile -t MISSING < <(missing_packages "${BUILD_DEPS[@]}")
if [ "${#MISSING[@]}" -gt 0 ]; then
    apt_update_once
    log "installing build dependencies: ${MISSING[*]}"
    "${APT_GET[@]}" install --no-install-recommends "${MISSING[@]}" \
        || die "could not install build dependencies: ${MISSING[*]}"
else
    log "build dependencies present: ${BUILD_DEPS[*]}"
fi
[ -f "$KEYRING" ] || die "$KEYRING missing: apt-get install debian-archive-keyring"
[ -x "$APT_HELPER" ] || die "$APT_HELPER missing (it comes with apt)"

# --- fetch the source from $EPICS_SUITE, with a private apt state ------------------------
WORK="$(mktemp -d /tmp/labctl-epics-base.XXXXXX)"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
APT_DIR="$WORK/apt"
mkdir -p "$APT_DIR/sources.list.d" "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
SOURCES_FILE="$APT_DIR/sources.list.d/labctl-epics-base-${EPICS_SUITE}-src.sources"
cat > "$SOURCES_FILE" <<EOF
# Source only (deb-src): EPICS base for labctl's Channel Access tests; binary packages never come from here.
Types: deb-src
URIs: ${EPICS_MIRROR}
Suites: ${EPICS_SUITE}
Components: main
Signed-By: ${KEYRING}
EOF
APT_SRC=(apt-get -q
    -o "Dir::Etc::SourceList=/dev/null"
    -o "Dir::Etc::SourceParts=$APT_DIR/sources.list.d"
    -o "Dir::State::Lists=$APT_DIR/lists"
    -o "Dir::Cache=$APT_DIR/cache"
    -o "APT::Sandbox::User=root")
# shellcheck disable=SC2206 # word splitting of LABCTL_EPICS_APT_OPTS is intended
APT_SRC+=(${LABCTL_EPICS_APT_OPTS:-})
log "fetching the ${EPICS_SUITE} source index (private apt state in $APT_DIR; system apt config untouched)"
"${APT_SRC[@]}" update || die "could not fetch the ${EPICS_SUITE} Sources index from ${EPICS_MIRROR}"

SPEC="epics-base${EPICS_VERSION:+=$EPICS_VERSION}"
log "apt-get source --print-uris $SPEC (suite ${EPICS_SUITE})"
URIS="$(cd "$WORK" && "${APT_SRC[@]}" source --print-uris "$SPEC")" \
    || die "apt-get source $SPEC failed (is that version in suite ${EPICS_SUITE} on ${EPICS_MIRROR}? choose another with LABCTL_EPICS_VERSION=<version> or LABCTL_EPICS_SUITE=<suite>)"
# Lines: 'URI' FILE SIZE SHA256:<hash>; the .orig and .debian tarballs are what the build needs.
mapfile -t TARBALLS < <(printf '%s\n' "$URIS" | awk "/^'.*(\\.orig\\.tar|\\.debian\\.tar)\\./ { gsub(\"'\", \"\", \$1); print \$1, \$2, \$4 }")
[ "${#TARBALLS[@]}" -eq 2 ] || die "expected an .orig and a .debian tarball for $SPEC, apt listed:
$URIS"
for entry in "${TARBALLS[@]}"; do
    read -r uri file hash <<<"$entry"
    case "$hash" in SHA256:*) ;; *) die "no SHA-256 listed for $file (got '$hash')" ;; esac
    log "downloading $file (checked against the index's $hash)"
    "$APT_HELPER" -o APT::Sandbox::User=root download-file "$uri" "$WORK/$file" "$hash" >/dev/null \
        || die "download of $uri failed or its SHA-256 did not match"
done
ORIG="$(ls "$WORK"/epics-base_*.orig.tar.*)"
DEBIAN_TAR="$(ls "$WORK"/epics-base_*.debian.tar.*)"
DEB_VERSION="$(basename "$DEBIAN_TAR" | sed -E 's/^epics-base_(.*)\.debian\.tar\..*$/\1/')"

SRC="$WORK/epics-base"
mkdir -p "$SRC"
tar -xf "$ORIG" -C "$SRC" --strip-components=1 || die "could not unpack $ORIG"
tar -xf "$DEBIAN_TAR" -C "$SRC" || die "could not unpack $DEBIAN_TAR"
[ -f "$SRC/configure/CONFIG_BASE_VERSION" ] || die "unpacked source not found in $SRC"
if [ -f "$SRC/debian/patches/series" ]; then
    while read -r patch _; do
        case "$patch" in '' | '#'*) continue ;; esac
        patch -d "$SRC" -p1 -N -s < "$SRC/debian/patches/$patch" || die "Debian patch $patch does not apply"
    done < "$SRC/debian/patches/series"
fi
UPSTREAM_VERSION="$(sed -n 's/^EPICS_\(VERSION\|REVISION\|MODIFICATION\|PATCH_LEVEL\) *= *\([0-9]*\).*/\2/p' "$SRC/configure/CONFIG_BASE_VERSION" | paste -sd.)"
log "source: epics-base $DEB_VERSION (EPICS $UPSTREAM_VERSION) from ${EPICS_SUITE}"

# --- build (libCom, libca, the tools) and install -----------------------------------------
BUILD_START=$SECONDS
ARCH="$(perl "$SRC/src/tools/EpicsHostArch.pl")" || die "cannot tell the EPICS host architecture"
STAGE="$WORK/stage"
MAKE_OPTS=(-j"$JOBS" "INSTALL_LOCATION=$STAGE" LINKER_USE_RPATH=ORIGIN COMMANDLINE_LIBRARY=EPICS)
log "building libCom, libca and the CA tools for $ARCH with $JOBS jobs"
for target in "$SRC:configure src" "$SRC/modules/libcom/src:" "$SRC/modules/ca/src/client:" "$SRC/modules/ca/src/tools:"; do
    dir="${target%%:*}"
    read -r -a goals <<<"${target#*:}"
    make -C "$dir" "${MAKE_OPTS[@]}" "${goals[@]}" >>"$WORK/build.log" 2>&1 \
        || { tail -n 40 "$WORK/build.log" >&2; die "build of EPICS $UPSTREAM_VERSION failed in ${dir#"$SRC"/} (log tail above)"; }
done

NEW="$PREFIX.new"
rm -rf "$NEW"
mkdir -p "$NEW/bin/$ARCH" "$NEW/lib/$ARCH"
for t in "${TOOLS[@]}"; do
    install -m 0755 "$STAGE/bin/$ARCH/$t" "$NEW/bin/$ARCH/$t" || die "$t was not built"
    ln -s "$ARCH/$t" "$NEW/bin/$t"
done
for lib in libca libCom; do
    cp -P "$STAGE/lib/$ARCH/$lib".so.* "$NEW/lib/$ARCH/" || die "$lib was not built"
done
printf 'epics-base %s (EPICS %s), Debian source from %s\n' "$DEB_VERSION" "$UPSTREAM_VERSION" "$EPICS_SUITE" > "$NEW/VERSION"
rm -rf "$PREFIX"
mv "$NEW" "$PREFIX"

tools_work || die "installed, but $PREFIX/bin/caget does not start: $("$PREFIX/bin/caget" -V 2>&1 | head -n 3)"
log "installed EPICS CA tools ($(cat "$PREFIX/VERSION")):"
log "  $PREFIX/bin/{$(IFS=,; echo "${TOOLS[*]}")} -> $ARCH/"
log "  $PREFIX/lib/$ARCH/$(cd "$PREFIX/lib/$ARCH" && ls | paste -sd' ')"
log "  $("$PREFIX/bin/caget" -V 2>&1 | grep -m1 'EPICS Version')"
log "build+install took $((SECONDS - BUILD_START)) s, whole script $SECONDS s"
