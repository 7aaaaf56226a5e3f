#!/usr/bin/env bash
# Build and install the Apache edition of TimescaleDB into the system's PostgreSQL 15.
#
#   bash scripts/install-timescaledb.sh        (as root; idempotent, exits at once when installed)
#
# Where it comes from: Debian's archive carries TimescaleDB (Apache-licensed part only, the
# TSL part is stripped as non-free) as the source package `timescaledb`. bookworm has no such
# package, so the source is taken from the trixie suite and built here against bookworm's
# PostgreSQL 15 (trixie's binary packages are built for PostgreSQL 17 only).
#
# Only *source* comes from trixie, and the system's apt configuration is never touched:
# the deb-src line for trixie is written to a separate sources file inside the temporary
# build directory, and `apt-get update`/`apt-get source` are pointed at that file and at a
# private lists/cache directory (-o Dir::Etc::SourceParts=... -o Dir::State::Lists=...).
# A deb-src entry cannot provide binary packages, so nothing can be installed from trixie,
# and the machine's own `apt-get update` does not start fetching trixie indexes.
# Everything that is installed (compiler, cmake, postgresql-server-dev-15) comes from the
# machine's configured bookworm sources.
#
# Version: trixie has timescaledb 2.19.3+dfsg-1+deb13u1 (verified 2025: builds cleanly
# against PostgreSQL 15.x of bookworm; 2.19 supports PostgreSQL 14-17). Should a future
# trixie update drop PostgreSQL 15 support, CMake stops with "TimescaleDB only supports
# PostgreSQL 14, 15, 16 and 17"-style errors; then pin the last good version, e.g.
#   TSDB_VERSION=2.19.3+dfsg-1+deb13u1 bash scripts/install-timescaledb.sh
# (`apt-get source` can fetch any version still in the chosen suite) or pick another
# suite with TSDB_SUITE=bookworm-backports|sid.
#
# Build flags: -DAPACHE_ONLY=1 (the Debian source has no tsl/ directory),
# -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF (no pg_regress/perl TAP needed), and, as Debian's own
# packaging does, -DUSE_TELEMETRY=OFF -DSEND_TELEMETRY_DEFAULT=OFF so that test clusters
# never try to phone home.
#
# Environment:
#   PG_CONFIG     pg_config of the target server (default /usr/lib/postgresql/15/bin/pg_config)
#   TSDB_SUITE    Debian suite to take the source from (default trixie)
#   TSDB_VERSION  exact Debian source version (default: the suite's current one)
#   TSDB_MIRROR   Debian mirror (default http://deb.debian.org/debian)
#   TSDB_APT_OPTS extra options for the private apt-get calls, e.g. for sid/testing on a
#                 snapshot mirror or a machine with a skewed clock (their Release files expire
#                 after a week; stable suites like trixie do not):
#                 TSDB_APT_OPTS="-o Acquire::Check-Valid-Until=false"
#   LABCTL_APT_UPDATED=1   `apt-get update` already ran in this run (set by install-test-deps.sh)
set -euo pipefail

PG_MAJOR=15
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config}"
TSDB_SUITE="${TSDB_SUITE:-trixie}"
TSDB_VERSION="${TSDB_VERSION:-}"
TSDB_MIRROR="${TSDB_MIRROR:-http://deb.debian.org/debian}"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg

log() { printf '[install-timescaledb] %s\n' "$*" >&2; }
die() { printf '[install-timescaledb] ERROR: %s\n' "$*" >&2; exit 1; }

# --- quick exit when already installed -------------------------------------------------
[ -x "$PG_CONFIG" ] || die "PostgreSQL ${PG_MAJOR} not found ($PG_CONFIG missing). Install it first: apt-get install postgresql-${PG_MAJOR}"
SHAREDIR="$("$PG_CONFIG" --sharedir)"
PKGLIBDIR="$("$PG_CONFIG" --pkglibdir)"
CONTROL="$SHAREDIR/extension/timescaledb.control"
if [ -f "$CONTROL" ] && [ -f "$PKGLIBDIR/timescaledb.so" ]; then
    log "TimescaleDB $(sed -n "s/^default_version *= *'\(.*\)'.*/\1/p" "$CONTROL") already installed for PostgreSQL ${PG_MAJOR} ($CONTROL); nothing to do."
    exit 0
fi

# --- from here on we install: need root --------------------------------------------------
if [ "$(id -u)" -ne 0 ]; then
    die "TimescaleDB is not installed for PostgreSQL ${PG_MAJOR} and installing it needs root. Run:
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
BUILD_DEPS=(postgresql-server-dev-${PG_MAJOR} cmake make gcc libc6-dev dpkg-dev libssl-dev xz-utils)
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

# --- fetch the source from $TSDB_SUITE, with a private apt state ------------------------
WORK="$(mktemp -d /tmp/labctl-timescaledb.XXXXXX)"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT
APT_DIR="$WORK/apt"
mkdir -p "$APT_DIR/sources.list.d" "$APT_DIR/lists/partial" "$APT_DIR/cache/archives/partial"
SOURCES_FILE="$APT_DIR/sources.list.d/labctl-timescaledb-${TSDB_SUITE}-src.sources"
cat > "$SOURCES_FILE" <<EOF
# Source only (deb-src): TimescaleDB for labctl's test clusters; binary packages never come from here.
Types: deb-src
URIs: ${TSDB_MIRROR}
Suites: ${TSDB_SUITE}
Components: main
Signed-By: ${KEYRING}
EOF
APT_SRC=(apt-get -q
    -o "Dir::Etc::SourceList=/dev/null"
    -o "Dir::Etc::SourceParts=$APT_DIR/sources.list.d"
    -o "Dir::State::Lists=$APT_DIR/lists"
    -o "Dir::Cache=$APT_DIR/cache"
    -o "APT::Sandbox::User=root")
# shellcheck disable=SC2206 # word splitting of TSDB_APT_OPTS is intended
APT_SRC+=(${TSDB_APT_OPTS:-})
log "fetching the ${TSDB_SUITE} source index (private apt state in $APT_DIR; system apt config untouched)"
"${APT_SRC[@]}" update || die "could not fetch the ${TSDB_SUITE} Sources index from ${TSDB_MIRROR}"

SPEC="timescaledb${TSDB_VERSION:+=$TSDB_VERSION}"
log "apt-get source $SPEC (suite ${TSDB_SUITE})"
( cd "$WORK" && "${APT_SRC[@]}" source "$SPEC" ) \
    || die "apt-get source $SPEC failed (is that version in suite ${TSDB_SUITE} on ${TSDB_MIRROR}? choose another with TSDB_VERSION=<version> or TSDB_SUITE=<suite>)"
SRC="$(find "$WORK" -mindepth 1 -maxdepth 1 -type d -name 'timescaledb-*' | head -n1)"
[ -n "$SRC" ] && [ -f "$SRC/CMakeLists.txt" ] || die "unpacked source not found in $WORK"
UPSTREAM_VERSION="$(sed -n 's/^version *= *//p' "$SRC/version.config")"
log "source: $(basename "$SRC") (upstream ${UPSTREAM_VERSION}) from ${TSDB_SUITE}"

# --- build and install -------------------------------------------------------------------
BUILD_START=$SECONDS
log "configuring against $("$PG_CONFIG" --version) ($PG_CONFIG), Apache edition"
cmake -S "$SRC" -B "$SRC/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DPG_CONFIG="$PG_CONFIG" \
    -DAPACHE_ONLY=1 \
    -DREGRESS_CHECKS=OFF \
    -DTAP_CHECKS=OFF \
    -DWARNINGS_AS_ERRORS=OFF \
    -DUSE_TELEMETRY=OFF \
    -DSEND_TELEMETRY_DEFAULT=OFF \
    || die "cmake failed for TimescaleDB ${UPSTREAM_VERSION} against PostgreSQL ${PG_MAJOR}. If this version no longer supports PostgreSQL ${PG_MAJOR}, pin an older one: TSDB_VERSION=2.19.3+dfsg-1+deb13u1 bash $0"
log "building with $(nproc) jobs"
make -C "$SRC/build" -j"$(nproc)" >"$WORK/build.log" 2>&1 || { tail -n 40 "$WORK/build.log" >&2; die "build of TimescaleDB ${UPSTREAM_VERSION} failed (log tail above)"; }
log "make install"
make -C "$SRC/build" install >"$WORK/install.log" 2>&1 || { tail -n 40 "$WORK/install.log" >&2; die "make install failed (log tail above)"; }

[ -f "$CONTROL" ] && [ -f "$PKGLIBDIR/timescaledb.so" ] && [ -f "$PKGLIBDIR/timescaledb-${UPSTREAM_VERSION}.so" ] \
    || die "installation incomplete: $CONTROL or $PKGLIBDIR/timescaledb*.so missing"
log "installed TimescaleDB ${UPSTREAM_VERSION} (Apache edition, Debian source $(basename "$SRC") from ${TSDB_SUITE}) for PostgreSQL ${PG_MAJOR}:"
log "  $CONTROL"
log "  $PKGLIBDIR/timescaledb.so, timescaledb-${UPSTREAM_VERSION}.so"
log "configure+build+install took $((SECONDS - BUILD_START)) s, whole script $SECONDS s"
log "clusters need: shared_preload_libraries = 'timescaledb'"
