#!/usr/bin/env bash
# Build (or import from the cache) the local Docker test image nodejob-test-python:bookworm and
# check it.  No registry is reachable, so the image is made from Debian packages:
#   debootstrap --variant=minbase bookworm ROOT <the mirror apt uses>
#   chroot ROOT apt-get install --no-install-recommends python3   (python3-minimal lacks the stdlib)
#   user nodejob (uid 1000), apt caches and docs removed
#   tar -C ROOT -c . -> ~/.cache/nodejob-ci/image/*.tar  (cache)  -> docker import (USER nodejob)
# Check: python3 -I -c "import json, asyncio, ssl, subprocess" as uid 1000, --read-only,
# --network none.
#
# Usage: tests/services/build-image.sh [--rebuild]
#   --rebuild  drop the cached tarball and the image first.
# Needs a running Docker engine (tests/services/dockerd.sh start) and root.
set -euo pipefail
# shellcheck source=tests/services/lib.sh
source "$(dirname "$0")/lib.sh"

if [[ ${1:-} == --rebuild ]]; then
    rm -f "$NODEJOB_CI_CACHE"/image/*.tar
    docker image rm -f "$NODEJOB_CI_IMAGE" >/dev/null 2>&1 || true
elif [[ $# -gt 0 ]]; then
    awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0" >&2
    exit 2
fi
ci_docker_up || ci_die "no Docker engine answers (start one: bash tests/services/dockerd.sh start)"
ci_step "image $NODEJOB_CI_IMAGE" ci_image_ensure verify
