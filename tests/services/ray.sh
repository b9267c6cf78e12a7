#!/usr/bin/env bash
# Create the Ray venv and start / stop a one-node Ray head (the one tests/run.sh would start).
#
# Usage: tests/services/ray.sh venv|start|stop|status
#   venv    create $NODEJOB_CI_CACHE/ray-venv (default ~/.cache/nodejob-ci/ray-venv) with
#           pip install "$NODEJOB_CI_RAY_SPEC", unless it is already there
#   start   venv, then 'ray start --head' (dashboard http://127.0.0.1:8265) unless one answers;
#           tests/run.sh leaves a head started (or adopted) this way running
#   stop    'ray stop' (stops every Ray process of this machine's user)
#   status  exit 0 if the dashboard answers http://127.0.0.1:8265/api/version
set -euo pipefail
# shellcheck source=tests/services/lib.sh
source "$(dirname "$0")/lib.sh"

case ${1:-} in
venv) ci_step "ray venv" ci_ray_venv ;;
start)
    ci_step "ray venv" ci_ray_venv
    ci_step "ray head" ci_ray_start
    ci_own_del ray # started or adopted by hand: tests/run.sh will leave it running
    ;;
stop)
    ci_step "stop ray" ci_ray_stop
    ci_own_del ray
    ;;
status)
    if ci_http_ok "$NODEJOB_CI_RAY_DASHBOARD/api/version"; then
        echo "Ray dashboard answers at $NODEJOB_CI_RAY_DASHBOARD"
    else
        echo "no Ray dashboard at $NODEJOB_CI_RAY_DASHBOARD"
        exit 1
    fi
    ;;
*)
    awk 'NR > 1 && /^#/ { print; next } NR > 1 { exit }' "$0" >&2
    exit 2
    ;;
esac
