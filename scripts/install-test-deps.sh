#!/usr/bin/env bash
# Install what labctl's test suite needs beyond Python packages (those come from
# requirements.lock into .venv):
#
#   1. the system libraries PySide6 (Qt 6 wheels from PyPI) needs to run offscreen
#      (QT_QPA_PLATFORM=offscreen) under pytest-qt, with pyqtgraph;
#   2. TimescaleDB (Apache edition) for PostgreSQL 15, built by scripts/install-timescaledb.sh;
#   3. EPICS base's Channel Access tools (caget, caput, camonitor, cainfo) for the Channel Access
#      conformance tests, built by scripts/install-epics-base.sh into $LABCTL_EPICS_PREFIX
#      (default /usr/local/lib/labctl-epics);
#   4. node-opcua & co. for the interoperability tests: `npm ci` in tests/node/ when
#      tests/node/package-lock.json exists and tests/node/node_modules is missing or stale.
#
# Idempotent and quick: everything is checked first (one dpkg-query, a few file tests) and
# only what is missing is installed, with at most one `apt-get update` per run.
# Run by `make test`; runs non-interactively (CI=true or not, nothing ever prompts).
# As root it installs; as another user, if something needs root it prints the exact
# command to run and exits non-zero (under CI=true it uses passwordless `sudo -n` when
# that works, and fails otherwise).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PG_MAJOR=15
PG_CONFIG="${PG_CONFIG:-/usr/lib/postgresql/${PG_MAJOR}/bin/pg_config}"
NODE_DIR="$ROOT/tests/node"
EPICS_PREFIX="${LABCTL_EPICS_PREFIX:-/usr/local/lib/labctl-epics}"

# Debian (bookworm) packages providing the shared libraries that PySide6-Essentials' Qt
# libraries link against (QtCore/Gui/Widgets/OpenGL/OpenGLWidgets/DBus/Svg/Test and the
# offscreen platform plugin; found with `objdump -p`/ldd on the wheel's libraries and
# /proc/self/maps of a running offscreen QApplication + pyqtgraph.PlotWidget), plus one
# font so text renders. Everything else they need (libc6, libstdc++6, zlib1g, libzstd1,
# ...) is in every Debian installation.
#   libQt6Core: libglib-2.0.so.0, libgthread-2.0.so.0     -> libglib2.0-0
#   libQt6Gui:  libEGL.so.1                               -> libegl1
#               libGL.so.1                                -> libgl1
#               libX11.so.6                               -> libx11-6
#               libxkbcommon.so.0                         -> libxkbcommon0
#               libfontconfig.so.1                        -> libfontconfig1
#               libfreetype.so.6                          -> libfreetype6
#   libQt6DBus (loaded by QtGui): libdbus-1.so.3          -> libdbus-1-3
#   a font for fontconfig                                 -> fonts-dejavu-core
QT_PACKAGES=(libglib2.0-0 libegl1 libgl1 libx11-6 libxkbcommon0 libfontconfig1 libfreetype6 libdbus-1-3 fonts-dejavu-core)

log() { printf '[install-test-deps] %s\n' "$*" >&2; }
die() { printf '[install-test-deps] ERROR: %s\n' "$*" >&2; exit 1; }
is_ci() { case "${CI:-}" in [Tt][Rr][Uu][Ee] | 1 | [Yy][Ee][Ss]) return 0 ;; *) return 1 ;; esac; }

export DEBIAN_FRONTEND=noninteractive

# --- check ---------------------------------------------------------------------------
missing_qt=()
while read -r pkg status; do
    [ "$status" = installed ] || missing_qt+=("$pkg")
done < <(
    # One dpkg-query for all packages; unknown packages are reported on stderr only,
    # so list every package explicitly and mark the ones dpkg did not print as missing.
    known="$(dpkg-query -W -f='${Package} ${db:Status-Status}\n' "${QT_PACKAGES[@]}" 2>/dev/null || true)"
    for p in "${QT_PACKAGES[@]}"; do
        s="$(printf '%s\n' "$known" | awk -v p="$p" '$1 == p { print $2; exit }')"
        printf '%s %s\n' "$p" "${s:-not-installed}"
    done
)

[ -x "$PG_CONFIG" ] || die "PostgreSQL ${PG_MAJOR} is not installed ($PG_CONFIG missing); the tests need its server binaries. Run:
    sudo apt-get update && sudo apt-get install -y postgresql-${PG_MAJOR}"
tsdb_missing=0
[ -f "$("$PG_CONFIG" --sharedir)/extension/timescaledb.control" ] \
    && [ -f "$("$PG_CONFIG" --pkglibdir)/timescaledb.so" ] || tsdb_missing=1

# The EPICS tools are present when all four are installed and caget starts (finds its libraries).
epics_missing=0
for tool in caget caput camonitor cainfo; do
    [ -x "$EPICS_PREFIX/bin/$tool" ] || epics_missing=1
done
[ "$epics_missing" -eq 1 ] || "$EPICS_PREFIX/bin/caget" -V >/dev/null 2>&1 || epics_missing=1

# node_modules is stale when npm's own record of the installed tree (the hidden lockfile
# node_modules/.package-lock.json, written by every npm ci/install) is missing or older
# than package.json or package-lock.json (e.g. after a pull that changed the lock file).
node_present=0 node_needed=0
if [ -f "$NODE_DIR/package-lock.json" ]; then
    node_present=1
    hidden="$NODE_DIR/node_modules/.package-lock.json"
    if [ ! -f "$hidden" ] || [ "$NODE_DIR/package-lock.json" -nt "$hidden" ] || [ "$NODE_DIR/package.json" -nt "$hidden" ]; then
        node_needed=1
        command -v npm >/dev/null 2>&1 || die "tests/node needs npm (Node.js >= 20) to install node-opcua; install Node.js 20 with npm, then re-run: bash scripts/install-test-deps.sh"
    fi
elif [ -f "$NODE_DIR/package.json" ]; then
    log "note: tests/node/package.json has no package-lock.json next to it; not running npm (commit a lock file)"
fi

if [ "${#missing_qt[@]}" -eq 0 ] && [ "$tsdb_missing" -eq 0 ] && [ "$epics_missing" -eq 0 ] && [ "$node_needed" -eq 0 ]; then
    log "all test dependencies present (Qt system libraries, TimescaleDB for PostgreSQL ${PG_MAJOR}, EPICS CA tools$([ "$node_present" -eq 1 ] && echo ', tests/node/node_modules'))"
    exit 0
fi

# --- privileges ------------------------------------------------------------------------
SUDO=()
if { [ "${#missing_qt[@]}" -gt 0 ] || [ "$tsdb_missing" -eq 1 ] || [ "$epics_missing" -eq 1 ]; } && [ "$(id -u)" -ne 0 ]; then
    if is_ci && command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
        log "CI=true and not root: using passwordless sudo"
        SUDO=(sudo -n env DEBIAN_FRONTEND=noninteractive)
    else
        {
            echo "[install-test-deps] missing system dependencies that need root to install:"
            [ "${#missing_qt[@]}" -gt 0 ] && echo "    Qt offscreen libraries: ${missing_qt[*]}"
            [ "$tsdb_missing" -eq 1 ] && echo "    TimescaleDB for PostgreSQL ${PG_MAJOR}"
            [ "$epics_missing" -eq 1 ] && echo "    EPICS CA tools (caget, caput, camonitor, cainfo) in $EPICS_PREFIX"
            echo "[install-test-deps] run:"
            echo "    sudo bash $ROOT/scripts/install-test-deps.sh"
            echo "[install-test-deps] or, step by step:"
            [ "${#missing_qt[@]}" -gt 0 ] && echo "    sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing_qt[*]}"
            [ "$tsdb_missing" -eq 1 ] && echo "    sudo bash $ROOT/scripts/install-timescaledb.sh"
            [ "$epics_missing" -eq 1 ] && echo "    sudo bash $ROOT/scripts/install-epics-base.sh"
        } >&2
        exit 1
    fi
fi

# --- install -----------------------------------------------------------------------------
APT_GET=(apt-get -y -q -o DPkg::Lock::Timeout=300 -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
if [ "${#missing_qt[@]}" -gt 0 ]; then
    log "installing Qt offscreen system libraries: ${missing_qt[*]}"
    log "apt-get update"
    "${SUDO[@]}" "${APT_GET[@]}" update || die "apt-get update failed (is the Debian archive reachable?)"
    export LABCTL_APT_UPDATED=1
    "${SUDO[@]}" "${APT_GET[@]}" install --no-install-recommends "${missing_qt[@]}" \
        || die "apt-get install ${missing_qt[*]} failed"
    if [ -x "$ROOT/.venv/bin/python" ]; then
        log "checking PySide6 + pyqtgraph offscreen"
        ( cd "$ROOT" && QT_QPA_PLATFORM=offscreen .venv/bin/python -c \
            "from PySide6.QtWidgets import QApplication; import pyqtgraph; app=QApplication([]); w=pyqtgraph.PlotWidget(); w.show(); app.processEvents()" ) \
            || die "PySide6 still fails to start offscreen after installing ${missing_qt[*]} (see the error above; ldd on .venv/lib/python3*/site-packages/PySide6/Qt/plugins/platforms/libqoffscreen.so shows missing libraries)"
    fi
else
    log "Qt offscreen system libraries present"
fi

if [ "$tsdb_missing" -eq 1 ]; then
    log "TimescaleDB missing for PostgreSQL ${PG_MAJOR}: running scripts/install-timescaledb.sh"
    "${SUDO[@]}" env LABCTL_APT_UPDATED="${LABCTL_APT_UPDATED:-}" PG_CONFIG="$PG_CONFIG" \
        bash "$ROOT/scripts/install-timescaledb.sh" || die "scripts/install-timescaledb.sh failed (see above)"
else
    log "TimescaleDB for PostgreSQL ${PG_MAJOR} present"
fi

if [ "$epics_missing" -eq 1 ]; then
    log "EPICS CA tools missing in $EPICS_PREFIX: running scripts/install-epics-base.sh"
    "${SUDO[@]}" env LABCTL_APT_UPDATED="${LABCTL_APT_UPDATED:-}" LABCTL_EPICS_PREFIX="$EPICS_PREFIX" \
        bash "$ROOT/scripts/install-epics-base.sh" || die "scripts/install-epics-base.sh failed (see above)"
else
    log "EPICS CA tools present in $EPICS_PREFIX"
fi

if [ "$node_needed" -eq 1 ]; then
    log "npm ci in tests/node (node_modules missing or older than package-lock.json)"
    ( cd "$NODE_DIR" && npm ci --no-audit --no-fund --no-progress ) || die "npm ci in tests/node failed (see above)"
fi
log "done"
