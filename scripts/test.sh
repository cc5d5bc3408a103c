#!/usr/bin/env bash
# Runs every check and test of imgforge on a fresh Debian 12 machine (as root): installs the
# Debian packages it needs, builds, lints, then runs the unit and integration tests (real qemu
# under TCG, fixture images built with debootstrap and cached in /var/tmp/imgforge-fixtures,
# the helper image in /var/cache/imgforge). Every test binary runs, and any failure fails it.
#
#   --fresh   the fresh-machine rehearsal: the build, the helper image cache and the fixtures
#             start empty, in a temporary directory removed afterwards (IMGFORGE_FRESH=1 too)
set -euo pipefail
cd "$(dirname "$0")/.."

fresh=${IMGFORGE_FRESH:-0}
for arg in "$@"; do
    case "$arg" in
        --fresh) fresh=1 ;;
        *) echo "usage: $0 [--fresh]" >&2; exit 2 ;;
    esac
done
if [ "$fresh" = 1 ]; then
    scratch=$(mktemp -d /var/tmp/imgforge-fresh.XXXXXX)
    # An interrupted fixture build can leave mounts (a chroot's /proc) behind: unmount them,
    # and never let the removal cross into another filesystem.
    cleanup() {
        findmnt -rn -o TARGET | grep -F "$scratch/" | sort -r | xargs -r -n1 umount -l || true
        rm -rf --one-file-system "$scratch"
    }
    trap cleanup EXIT
    export CARGO_TARGET_DIR=$scratch/target IMGFORGE_CACHE_DIR=$scratch/cache IMGFORGE_FIXTURES=$scratch/fixtures
    echo "== fresh-machine rehearsal: build, helper image cache and fixtures start empty in $scratch"
fi
started=$(date +%s)

bash scripts/setup.sh
echo "== $(qemu-img --version | head -n1); $(qemu-system-x86_64 --version | head -n1)"
cargo build --workspace --locked
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The fuzz targets (tests/tests/fuzz.rs) take IMGFORGE_FUZZ_SECONDS (default 150) in total,
# about half of it in wall time at two threads; IMGFORGE_FUZZ_SEED picks other cases.
# Two cores: at most two helper VMs at once. --no-fail-fast: one failing test binary must not
# hide the failures of the others.
cargo test --workspace --locked --no-fail-fast -- --test-threads 2
echo "== every check and test passed in $(($(date +%s) - started)) s$([ "$fresh" = 1 ] && echo ' (fresh caches)')"
