#!/usr/bin/env bash
# Start / stop a background dockerd for the tests (the one tests/run.sh would start).
#
# Usage: tests/services/dockerd.sh start|stop|status
#   start   install docker.io if missing, start dockerd unless an engine already answers,
#           wait for 'docker info'; log: $NODEJOB_CI_STATE/dockerd.log (default /tmp/nodejob-ci);
#           tests/run.sh leaves a dockerd started (or adopted) this way running
#   stop    stop the dockerd that 'start' started (by its pid file); others are left alone
#   status  exit 0 if a Docker engine answers at $DOCKER_HOST
set -euo pipefail
# shellcheck source=tests/services/lib.sh
source "$(dirname "$0")/lib.sh"

case ${1:-} in
start)
    ci_step "apt packages" ci_apt_ensure docker.io
    ci_step "dockerd" ci_dockerd_start
    ci_own_del dockerd # started or adopted by hand: tests/run.sh will leave it running
    ;;
stop)
    ci_step "stop dockerd" ci_dockerd_stop
    ci_own_del dockerd
    ;;
status)
    if ci_docker_up; then
        echo "Docker engine answers at $DOCKER_HOST"
    else
        echo "no Docker engine at $DOCKER_HOST"
        exit 1
    fi
    ;;
*)
    awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0" >&2
    exit 2
    ;;
esac
