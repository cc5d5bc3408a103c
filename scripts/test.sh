#!/usr/bin/env bash
# Runs every check and test of imgforge on a fresh Debian 12 machine (as root): installs the
# Debian packages it needs, builds, lints, then runs the unit and integration tests (real qemu
# under TCG, fixture images built with debootstrap and cached in /var/tmp/imgforge-fixtures).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
cargo build --workspace --locked
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Two cores: at most two helper VMs at once.
cargo test --workspace --locked -- --test-threads 2
