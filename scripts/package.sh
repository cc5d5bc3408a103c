#!/usr/bin/env bash
# Builds imgforge_<version>_amd64.deb from the workspace: the release binary (the helper VM's
# binary and the task scripts are embedded in it), the manual pages, the bash, zsh and fish
# completions and /etc/default/imgforge made by that binary (`imgforge generate`, hidden), the
# Ganeti OS definition it writes (`imgforge ganeti install-os`) in /srv/ganeti/os/imgforge,
# and packaging/ (control, changelog, copyright, postrm, lintian overrides). A staged tree
# packed by dpkg-deb: see README ("Install the package") for why not cargo-deb.
#
#   bash scripts/package.sh [--binary PATH] [--out DIR] [--lintian]
#     --binary PATH  package this imgforge instead of building the release one (the tests give
#                    the binary they run)
#     --out DIR      where the .deb goes (default: the current directory)
#     --lintian      run lintian on the result; any tag it prints fails the build
# Prints the path of the .deb on its last line.
set -euo pipefail
workspace=$(cd "$(dirname "$0")/.." && pwd)
binary= out=$PWD lint=0
while [ $# -gt 0 ]; do
    case "$1" in
        --binary) binary=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        --lintian) lint=1; shift ;;
        *) echo "usage: $0 [--binary PATH] [--out DIR] [--lintian]" >&2; exit 2 ;;
    esac
done
for tool in dpkg-deb dpkg-shlibdeps dpkg-parsechangelog strip gzip; do
    command -v "$tool" >/dev/null || { echo "package: $tool is missing: run bash scripts/setup.sh as root" >&2; exit 4; }
done
if [ -z "$binary" ]; then
    (cd "$workspace" && cargo build --release --locked -p imgforge)
    binary=${CARGO_TARGET_DIR:-$workspace/target}/release/imgforge
fi
[ -x "$binary" ] || { echo "package: $binary is not an executable" >&2; exit 2; }

# "imgforge 0.1.0 (commit ..., helper image recipe ...)"
version=$("$binary" --version | awk 'NR == 1 { print $2 }')
changelog=$workspace/packaging/changelog
logged=$(dpkg-parsechangelog -l "$changelog" -S Version)
if [ "$logged" != "$version" ]; then
    echo "package: packaging/changelog's last entry is $logged but the binary is $version: add an entry" >&2
    exit 2
fi
# Every file's time is the changelog entry's, so that the same sources give the same package.
export SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(dpkg-parsechangelog -l "$changelog" -S Timestamp)}

umask 022
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
root=$scratch/root
mkdir -p "$root"/usr/bin "$root"/usr/share/man/man1 "$root"/usr/share/doc/imgforge \
    "$root"/usr/share/bash-completion/completions "$root"/usr/share/zsh/vendor-completions \
    "$root"/usr/share/fish/vendor_completions.d "$root"/usr/share/lintian/overrides \
    "$root"/etc/default "$root"/var/lib/imgforge/images "$root"/DEBIAN

strip --strip-unneeded --remove-section=.comment --remove-section=.note -o "$root/usr/bin/imgforge" "$binary"
chmod 0755 "$root/usr/bin/imgforge"
imgforge=$root/usr/bin/imgforge

"$imgforge" generate man "$scratch"
for page in "$scratch"/*.1; do
    gzip -9n < "$page" > "$root/usr/share/man/man1/$(basename "$page").gz"
done
"$imgforge" generate completions bash > "$root/usr/share/bash-completion/completions/imgforge"
"$imgforge" generate completions zsh > "$root/usr/share/zsh/vendor-completions/_imgforge"
"$imgforge" generate completions fish > "$root/usr/share/fish/vendor_completions.d/imgforge.fish"
"$imgforge" generate default-config > "$root/etc/default/imgforge"
"$imgforge" ganeti install-os --os-dir "$root/srv/ganeti/os" --imgforge-path /usr/bin/imgforge >/dev/null

gzip -9n < "$changelog" > "$root/usr/share/doc/imgforge/changelog.gz"
# The crates linked into the binary and into the embedded helper, with their licenses.
crates() {
    (cd "$workspace" && cargo tree --locked --offline -e normal --prefix none -f '{p} {l}' "$@") \
        | sed 's/ (\*)$//' | grep -v ' (/' | sort -u | sed 's/^/   /'
}
host_crates=$(crates -p imgforge)
helper_crates=$(crates -p imgforge-helper --target x86_64-unknown-linux-gnu)
awk -v host="$host_crates" -v helper="$helper_crates" \
    '$0 == "@HOST_CRATES@" { print host; next } $0 == "@HELPER_CRATES@" { print helper; next } { print }' \
    "$workspace/packaging/copyright.in" > "$root/usr/share/doc/imgforge/copyright"
cp "$workspace/packaging/lintian-overrides" "$root/usr/share/lintian/overrides/imgforge"

# Library dependencies of the binary, as dpkg-shlibdeps finds them (it wants a debian/control).
mkdir -p "$scratch/shlibs/debian"
printf 'Source: imgforge\n\nPackage: imgforge\nArchitecture: amd64\n' > "$scratch/shlibs/debian/control"
shlibs=$(cd "$scratch/shlibs" && dpkg-shlibdeps -O "$imgforge" | sed -n 's/^shlibs:Depends=//p')
installed_size=$(du -sk --apparent-size --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@INSTALLED_SIZE@/$installed_size/" -e "s/@SHLIBS@/$shlibs/" \
    "$workspace/packaging/control" > "$root/DEBIAN/control"
echo /etc/default/imgforge > "$root/DEBIAN/conffiles"
install -m 0755 "$workspace/packaging/postrm" "$root/DEBIAN/postrm"
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z | xargs -0 md5sum) > "$root/DEBIAN/md5sums"

find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
mkdir -p "$out"
deb=$(cd "$out" && pwd)/imgforge_${version}_amd64.deb
dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
if [ "$lint" = 1 ]; then
    tags=$(lintian --tag-display-limit 0 "$deb" || true)
    if [ -n "$tags" ]; then
        printf '%s\n' "$tags" >&2
        echo "package: lintian tags above (see packaging/lintian-overrides for the ones explained)" >&2
        exit 1
    fi
fi
echo "$deb"
