# Sourced by the imgforge task scripts inside the helper VM. Not a task (no NN- prefix).
# shellcheck shell=sh
set -eu

log() { printf '%s\n' "$*"; }
warn() { printf 'WARNING: %s\n' "$*"; }
# die MESSAGE: fail the task; MESSAGE is what the host reports.
die() {
    printf '%s\n' "$*" > "${IMGFORGE_ERROR_FILE:-/dev/null}"
    printf 'ERROR: %s\n' "$*" >&2
    exit 1
}
# guest_path GUESTPATH: the helper path of GUESTPATH, resolved inside the guest root
# (symlinks in a hostile image cannot lead out of it).
guest_path() { imgforge-helper guest-path "$1"; }

[ "${IMGFORGE_VERBOSE:-no}" = yes ] && set -x
true
