#!/usr/bin/env bash
# THE test command:  bash tests/run.sh [PYTEST ARGS...]
#
# On a Debian 12 machine, as root, it makes everything the tests need and runs pytest:
#   1. apt: docker.io, debootstrap (only if missing; 'apt-get update' once first)
#   2. python3 -m pip install -e '.[test]'   (skipped when this checkout + pyproject is installed)
#   3. dockerd in the background unless an engine answers, and the local image
#      nodejob-test-python:bookworm unless present (tests/services/build-image.sh; cached tarball)
#   4. a Ray venv (~/.cache/nodejob-ci/ray-venv) and a one-node Ray head unless one answers
#   5. exports NODEJOB_TEST_DOCKER_IMAGE, DOCKER_HOST, NODEJOB_TEST_RAY_ADDRESS
#   6. python3 -m pytest "$@"   (run from the repository root)
#   7. on exit, stops the services that IT started; the exit status is pytest's.
#
# Switches (environment):
#   NODEJOB_TEST_NO_DOCKER=1   no docker.io/debootstrap/dockerd/image; docker tests skip
#   NODEJOB_TEST_NO_RAY=1      no Ray venv/head; ray tests skip
#   NODEJOB_TEST_KEEP_SERVICES=1  leave the services this run started running (fast re-runs)
#   NODEJOB_CI_REINSTALL=1     run the pip install even when it looks done
# First argument --install-only: do steps 1-2 and exit (.ci/run lints in between).
# More knobs (cache/state dirs, timeouts, Ray version): tests/services/lib.sh, docs/howto-ci.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# shellcheck source=tests/services/lib.sh
source "$ROOT/tests/services/lib.sh"

_ci_true() {
    case ${1,,} in
    1 | true | yes | on) return 0 ;;
    *) return 1 ;;
    esac
}

install_only=0
if [[ ${1:-} == --install-only ]]; then
    install_only=1
    shift
fi
use_docker=1 use_ray=1
_ci_true "${NODEJOB_TEST_NO_DOCKER:-}" && use_docker=0
_ci_true "${NODEJOB_TEST_NO_RAY:-}" && use_ray=0

mkdir -p "$NODEJOB_CI_STATE"

# Several runs may share this machine's services (two developers' test runs at once). The set-up
# is serialised by start.lock. Every run holds users.lock shared while it may use the services.
# A service that a run started is listed in $NODEJOB_CI_STATE/owned-services, and at exit the run
# that can take users.lock exclusively (the last user) stops what is listed; a service started by
# hand (tests/services/*.sh start) is never listed, so never stopped here. Daemons never inherit
# these lock fds.
# Lock order: users.lock, then start.lock.
exec {start_fd}>"$NODEJOB_CI_STATE/start.lock" {users_fd}>"$NODEJOB_CI_STATE/users.lock"
if ! flock -s -n "$users_fd"; then
    ci_log "another tests/run.sh is stopping the services; waiting for it"
    flock -s "$users_fd"
fi
if ! flock -x -n "$start_fd"; then
    ci_log "another tests/run.sh is setting up the services; waiting for it"
    flock -x "$start_fd"
fi

CI_DOCKERD_STARTED=0 CI_RAY_STARTED=0
# shellcheck disable=SC2317  # called by the EXIT trap
cleanup() {
    trap - EXIT INT TERM
    if _ci_true "${NODEJOB_TEST_KEEP_SERVICES:-}"; then
        if ((CI_DOCKERD_STARTED || CI_RAY_STARTED)); then
            ci_own_del ray
            ci_own_del dockerd
            ci_log "NODEJOB_TEST_KEEP_SERVICES: left the services running" \
                "(stop: bash tests/services/ray.sh stop; bash tests/services/dockerd.sh stop)"
        fi
        return 0
    fi
    [[ -s $NODEJOB_CI_STATE/owned-services ]] || return 0
    if ! flock -x -n "$users_fd"; then
        ((CI_DOCKERD_STARTED || CI_RAY_STARTED)) &&
            ci_log "another tests/run.sh is using the services: the last one out stops them"
        return 0
    fi
    # exclusive: nobody else uses the services, and a new run waits for the shared lock
    if ci_own_has ray; then
        ci_step "stop Ray head" ci_ray_stop || true
        ci_own_del ray
    fi
    if ci_own_has dockerd; then
        ci_step "stop dockerd" ci_dockerd_stop || true
        ci_own_del dockerd
    fi
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 1. Debian packages
pkgs=()
((use_docker)) && pkgs+=(docker.io debootstrap)
if ((${#pkgs[@]})); then
    ci_step "1/6 apt packages" ci_apt_ensure "${pkgs[@]}"
else
    ci_log "1/6 apt packages: none needed (NODEJOB_TEST_NO_DOCKER)"
fi

# 2. the project, editable, with its test extra
ci_step "2/6 pip install -e '.[test]'" ci_pip_install "$ROOT"
if ((install_only)); then
    exit 0
fi

# 3. Docker engine and test image
if ((use_docker)); then
    ci_step "3/6 dockerd" ci_dockerd_start
    ci_step "3/6 test image" ci_image_ensure
    export NODEJOB_TEST_DOCKER_IMAGE=$NODEJOB_CI_IMAGE DOCKER_HOST
else
    ci_log "3/6 docker: skipped (NODEJOB_TEST_NO_DOCKER); docker tests will skip"
    unset NODEJOB_TEST_DOCKER_IMAGE
fi

# 4. Ray head
if ((use_ray)); then
    ci_step "4/6 Ray venv" ci_ray_venv
    ci_step "4/6 Ray head" ci_ray_start
    export NODEJOB_TEST_RAY_ADDRESS=$NODEJOB_CI_RAY_DASHBOARD
else
    ci_log "4/6 ray: skipped (NODEJOB_TEST_NO_RAY); ray tests will skip"
    unset NODEJOB_TEST_RAY_ADDRESS
fi

flock -u "$start_fd"

# 5. environment for the tests
ci_log "5/6 env: NODEJOB_TEST_DOCKER_IMAGE=${NODEJOB_TEST_DOCKER_IMAGE:-} DOCKER_HOST=${DOCKER_HOST:-}" \
    "NODEJOB_TEST_RAY_ADDRESS=${NODEJOB_TEST_RAY_ADDRESS:-}"

# 6. the tests
rc=0
ci_step "6/6 python3 -m pytest $*" python3 -m pytest "$@" || rc=$?
exit "$rc"
