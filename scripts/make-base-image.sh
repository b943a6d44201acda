#!/usr/bin/env bash
# Make the local base image CI builds docker/Dockerfile.8gb on (only BASE_IMAGE is swapped).
#
# No container registry is reachable from CI, so `FROM nvidia/cuda:...` cannot be pulled there.
# Instead: debootstrap a minimal Debian bookworm from the Debian mirror this machine uses, add this
# machine's CA bundle (the package registries sit behind a TLS proxy whose CA only the host trusts)
# and the host's pip index settings, then `docker import` it. Skipped when the image already exists.
#
# Usage: scripts/make-base-image.sh [IMAGE_TAG]     (default: vlkit-ci-base:bookworm)
set -euo pipefail

TAG="${1:-${VLKIT_CI_BASE_IMAGE:-vlkit-ci-base:bookworm}}"
SUITE=bookworm
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt

if docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG exists; reusing it"
    exit 0
fi

# The mirror apt already uses here (deb822 or one-line format); Debian's default otherwise.
mirror="$(sed -n 's/^URIs:[[:space:]]*\(http[^[:space:]]*\/debian\)[[:space:]]*$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1)"
if [[ -z "$mirror" ]]; then
    mirror="$(sed -n 's/^deb[[:space:]]\+\(http[^[:space:]]*\/debian\)[[:space:]].*/\1/p' /etc/apt/sources.list 2>/dev/null | head -n1)"
fi
mirror="${mirror:-http://deb.debian.org/debian}"

rootfs="$(mktemp -d /var/tmp/vlkit-base.XXXXXX)"
trap 'rm -rf "$rootfs" "$rootfs.log"' EXIT

echo "debootstrap $SUITE from $mirror ..."
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    "$SUITE" "$rootfs" "$mirror" >"$rootfs.log" 2>&1 || { tail -n 30 "$rootfs.log"; exit 1; }

# Trust what the host trusts. A copy under /usr/local/share/ca-certificates keeps it in the bundle
# even if a later `update-ca-certificates` regenerates /etc/ssl/certs/ca-certificates.crt.
install -m 0644 "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
install -m 0644 "$CA_BUNDLE" "$rootfs/usr/local/share/ca-certificates/vlkit-host-bundle.crt"

# pip inside the build uses certifi unless told otherwise; point it at the system bundle, and at the
# host's index when the host uses a non-default one (a local file:// index cannot be seen from a build).
{
    echo "[global]"
    echo "cert = /etc/ssl/certs/ca-certificates.crt"
    echo "timeout = 180"
    index_url="$(pip3 config get global.index-url 2>/dev/null || true)"
    if [[ "$index_url" == http* ]]; then echo "index-url = $index_url"; fi
} >"$rootfs/etc/pip.conf"

# Keep apt lists and docs out of the image; the Dockerfile runs apt-get update itself.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*

tar -C "$rootfs" -c . | docker import \
    --change 'CMD ["/bin/bash"]' \
    --change 'ENV LANG=C.UTF-8' \
    - "$TAG" >/dev/null
echo "made base image $TAG ($(docker image inspect -f '{{.Size}}' "$TAG" | awk '{printf "%.0f MB", $1/1e6}'))"
