# shellcheck shell=bash
# shellcheck disable=SC2034  # CI_*_STARTED, CI_NOTE: read by the callers
# Helpers shared by tests/run.sh, .ci/run and tests/services/*.sh.  Source it; don't run it.
#
# Every function that is a "step" sets CI_NOTE to a short description of what it did
# ("cached", "started", ...) so that ci_step can print it on its progress line.
#
# Knobs (environment, all optional):
#   NODEJOB_CI_CACHE   persistent cache (Ray venv, image rootfs tarball, pip stamps)
#                      default ${XDG_CACHE_HOME:-~/.cache}/nodejob-ci
#   NODEJOB_CI_STATE   run-time state (logs, pid files, Ray temp dir, locks), default /tmp/nodejob-ci
#                      (keep it short: Ray's unix socket paths live below it, max 107 bytes)
#   NODEJOB_CI_RAY_SPEC        pip requirement for the Ray venv
#   NODEJOB_CI_DOCKER_TIMEOUT  seconds to wait for dockerd to answer (default 60)
#   NODEJOB_CI_RAY_TIMEOUT     seconds to wait for the Ray dashboard to answer (default 90)
#   NODEJOB_CI_RAY_JOB_START_TIMEOUT  the head's RAY_JOB_START_TIMEOUT_SECONDS (default 60)

NODEJOB_CI_CACHE="${NODEJOB_CI_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/nodejob-ci}"
NODEJOB_CI_STATE="${NODEJOB_CI_STATE:-/tmp/nodejob-ci}"
NODEJOB_CI_IMAGE="nodejob-test-python:bookworm"
# Bump the first number when the root file system recipe (ci_build_rootfs) changes, the second
# when only the import options (ci_image_ensure) change. The cached tarball is named after the
# first, the image carries both (ENV NODEJOB_TEST_IMAGE_RECIPE), so a stale one is remade.
NODEJOB_CI_ROOTFS_RECIPE=1
NODEJOB_CI_IMAGE_RECIPE=$NODEJOB_CI_ROOTFS_RECIPE.2
NODEJOB_CI_RAY_SPEC="${NODEJOB_CI_RAY_SPEC:-ray[default]==2.60.0}"
NODEJOB_CI_RAY_VENV="$NODEJOB_CI_CACHE/ray-venv"
NODEJOB_CI_RAY_DASHBOARD="http://127.0.0.1:8265"
export DOCKER_HOST="${DOCKER_HOST:-unix:///var/run/docker.sock}"

# ---------------------------------------------------------------------------- logging / timing

_ci_us() { local t=${EPOCHREALTIME/[.,]/}; echo "${t#0}"; }
_ci_fmt() { printf '%d.%d' $(($1 / 1000000)) $((($1 % 1000000) / 100000)); }
: "${NODEJOB_CI_T0:=$(_ci_us)}"
export NODEJOB_CI_T0

ci_log() { printf '[nodejob-ci %6ss] %s\n' "$(_ci_fmt $(($(_ci_us) - NODEJOB_CI_T0)))" "$*" >&2; }
ci_die() {
    ci_log "ERROR: $*"
    exit 1
}

# ci_step "description" command [args...]: run a step, print one line with its duration.
# A failing step prints "FAILED" and returns the command's status.
ci_step() {
    local what=$1 start rc=0
    shift
    start=$(_ci_us)
    CI_NOTE=""
    "$@" || rc=$?
    local took
    took=$(_ci_fmt $(($(_ci_us) - start)))
    if ((rc == 0)); then
        ci_log "$what: ${CI_NOTE:-done} (${took}s)"
    else
        ci_log "$what: FAILED with status $rc (${took}s)"
    fi
    return "$rc"
}

_ci_tail() { # _ci_tail FILE: show the end of a log on stderr
    [[ -f $1 ]] || return 0
    echo "----- last lines of $1 -----" >&2
    tail -n "${2:-40}" "$1" >&2
    echo "-----" >&2
}

# _ci_detach CMD...: exec CMD in a new session (a Ctrl-C in the terminal must not reach a
# daemon) with only stdin/stdout/stderr open (a daemon must not inherit run.sh's lock files).
# Call it in a subshell: ( _ci_detach dockerd ... ) >log 2>&1 &
_ci_detach() {
    local fd
    for fd in "/proc/$BASHPID/fd/"*; do
        fd=${fd##*/}
        ((fd > 2)) && eval "exec $fd>&-"
    done
    exec setsid -w "$@"
}

# _ci_alive PID [NAME]: is PID a live process (not a zombie), named NAME if given?
_ci_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    [[ -z ${2:-} || $stat == "$1 ($2) "* ]] || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != Z ]]
}

_ci_need_root() { [[ $EUID -eq 0 ]] || ci_die "$1 needs root (run as root, or start it yourself)"; }

# ---------------------------------------------------------------------------- ownership

# Services that a tests/run.sh started are listed in $NODEJOB_CI_STATE/owned-services (one name
# a line: dockerd, ray). Whichever run is the last user of the services stops what is listed
# (see run.sh). Services started by hand (dockerd.sh start, ray.sh start) are not listed, and
# are never stopped by tests/run.sh.
_CI_OWNED="$NODEJOB_CI_STATE/owned-services"
ci_own_add() { grep -qx "$1" "$_CI_OWNED" 2>/dev/null || echo "$1" >>"$_CI_OWNED"; }
ci_own_del() {
    [[ -f $_CI_OWNED ]] || return 0
    grep -vx "$1" "$_CI_OWNED" >"$_CI_OWNED.tmp" || true
    mv "$_CI_OWNED.tmp" "$_CI_OWNED"
}
ci_own_has() { grep -qx "$1" "$_CI_OWNED" 2>/dev/null; }

# ---------------------------------------------------------------------------- apt

# ci_apt_ensure PKG...: install the Debian packages that are missing; 'apt-get update' once,
# and only if something is missing.
ci_apt_ensure() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    if ((${#missing[@]} == 0)); then
        CI_NOTE="already installed: $*"
        return 0
    fi
    _ci_need_root "installing ${missing[*]}"
    mkdir -p "$NODEJOB_CI_STATE"
    local log=$NODEJOB_CI_STATE/apt.log
    ci_log "apt: installing ${missing[*]} (log: $log)"
    if ! { DEBIAN_FRONTEND=noninteractive apt-get update -q &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"; } \
        </dev/null >"$log" 2>&1; then
        _ci_tail "$log"
        ci_die "apt-get install ${missing[*]} failed"
    fi
    CI_NOTE="installed ${missing[*]}"
}

# The Debian mirror apt uses (for debootstrap): first bookworm URI in the apt sources.
ci_apt_mirror() {
    local f uri
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f $f ]] || continue
        # deb822: a stanza with "URIs:" and a "Suites:" naming plain bookworm
        uri=$(awk 'BEGIN{RS=""; FS="\n"}
                   /(^|\n)Suites:[^\n]*[ \t]bookworm([ \t]|$|\n)/ && !/(^|\n)Enabled:[ \t]*no/ {
                       for (i = 1; i <= NF; i++) if ($i ~ /^URIs:/) { sub(/^URIs:[ \t]*/, "", $i); split($i, u, /[ \t]+/); print u[1]; exit } }' "$f")
        [[ -n $uri ]] && {
            echo "$uri"
            return 0
        }
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f $f ]] || continue
        # one-line style: deb [opts] URI bookworm main
        uri=$(sed -nE 's/^[[:space:]]*deb[[:space:]]+(\[[^]]*\][[:space:]]+)?([^[:space:]]+)[[:space:]]+bookworm[[:space:]].*/\2/p' "$f" | head -n1)
        [[ -n $uri ]] && {
            echo "$uri"
            return 0
        }
    done
    echo "http://deb.debian.org/debian"
}

# ---------------------------------------------------------------------------- pip

# ci_pip_install ROOT: 'pip install -e ROOT[test]' unless this exact pyproject was already installed
# editable from this exact checkout into this python3.
ci_pip_install() {
    local root=$1 key stamp
    key=$( { echo "$root"; command -v python3; python3 -VV; cat "$root/pyproject.toml"; } | sha256sum | cut -c1-16)
    stamp=$NODEJOB_CI_CACHE/pip-stamps/$key
    if [[ -f $stamp && -z ${NODEJOB_CI_REINSTALL:-} ]] &&
        python3 - "$root" <<'EOF' 2>/dev/null; then
import importlib.util, os, sys
spec = importlib.util.find_spec("nodejob")
root = os.path.realpath(sys.argv[1])
sys.exit(0 if spec and spec.origin and os.path.realpath(spec.origin).startswith(root + os.sep) else 1)
EOF
        CI_NOTE="already installed (editable from $root)"
        return 0
    fi
    mkdir -p "$NODEJOB_CI_STATE" "${stamp%/*}"
    local log=$NODEJOB_CI_STATE/pip-install.log
    if ! python3 -m pip install --progress-bar off -e "${root}[test]" </dev/null >"$log" 2>&1; then
        _ci_tail "$log"
        ci_die "pip install -e '.[test]' failed (log: $log)"
    fi
    touch "$stamp"
    CI_NOTE="installed -e '.[test]' (log: $log)"
}

# ---------------------------------------------------------------------------- docker

ci_docker_up() { timeout 20 docker info >/dev/null 2>&1; }

CI_DOCKERD_PIDFILE="$NODEJOB_CI_STATE/dockerd.pid"

# Start dockerd in the background unless a Docker engine already answers at $DOCKER_HOST.
# Sets CI_DOCKERD_STARTED=1 when it started one.
ci_dockerd_start() {
    CI_DOCKERD_STARTED=0
    if ci_docker_up; then
        CI_NOTE="already running ($DOCKER_HOST)"
        return 0
    fi
    _ci_need_root "starting dockerd"
    command -v dockerd >/dev/null || ci_die "dockerd not found: apt-get install docker.io"
    [[ $DOCKER_HOST == unix:///var/run/docker.sock ]] ||
        ci_die "no Docker engine answers at DOCKER_HOST=$DOCKER_HOST (only the default socket is started here)"
    mkdir -p "$NODEJOB_CI_STATE"
    # A pid file left by a dockerd that was killed: dockerd refuses to start while a process of
    # that pid exists, whatever it is.
    local old
    old=$(cat "$CI_DOCKERD_PIDFILE" 2>/dev/null) && ! _ci_alive "$old" dockerd && rm -f "$CI_DOCKERD_PIDFILE"
    local log=$NODEJOB_CI_STATE/dockerd.log timeout=${NODEJOB_CI_DOCKER_TIMEOUT:-60} pid deadline
    echo "=== dockerd started $(date -Is) ===" >>"$log"
    CI_DOCKERD_STARTED=1 # ours from before the start, as for Ray
    ci_own_add dockerd
    (_ci_detach dockerd --pidfile "$CI_DOCKERD_PIDFILE") </dev/null >>"$log" 2>&1 &
    pid=$!
    deadline=$(($(_ci_us) + timeout * 1000000))
    until ci_docker_up; do
        if ! _ci_alive "$pid"; then
            _ci_tail "$log"
            ci_die "dockerd exited during start-up (log: $log)"
        fi
        if (($(_ci_us) > deadline)); then
            _ci_tail "$log"
            kill "$pid" 2>/dev/null || true
            ci_die "dockerd did not answer 'docker info' within ${timeout}s (log: $log)"
        fi
        sleep 0.2
    done
    CI_NOTE="started dockerd pid $pid (log: $log)"
}

# Stop the dockerd that ci_dockerd_start started (identified by its pid file).
ci_dockerd_stop() {
    local pid i
    pid=$(cat "$CI_DOCKERD_PIDFILE" 2>/dev/null) || {
        CI_NOTE="no pid file $CI_DOCKERD_PIDFILE: not ours, left alone"
        return 0
    }
    if ! _ci_alive "$pid" dockerd; then
        CI_NOTE="not running"
        return 0
    fi
    kill -TERM "$pid"
    for ((i = 0; i < 300; i++)); do # dockerd stops its containers first (up to 15 s each)
        _ci_alive "$pid" || {
            CI_NOTE="stopped dockerd pid $pid"
            return 0
        }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    CI_NOTE="dockerd pid $pid killed after 30 s"
}

# ---------------------------------------------------------------------------- test image

_ci_image_recipe_of() { # the recipe number baked into an imported image, or nothing
    docker image inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$NODEJOB_CI_IMAGE" 2>/dev/null |
        sed -n 's/^NODEJOB_TEST_IMAGE_RECIPE=//p'
}

# Build the image's root file system with debootstrap into a tarball (the cache).
ci_build_rootfs() {
    local tarball=$1 mirror work rootfs log
    _ci_need_root "building the test image (debootstrap, chroot)"
    command -v debootstrap >/dev/null || ci_die "debootstrap not found: apt-get install debootstrap"
    mirror=$(ci_apt_mirror)
    mkdir -p "${tarball%/*}"
    work=$(mktemp -d "${tarball%/*}/build.XXXXXX")
    rootfs=$work/rootfs
    log=$NODEJOB_CI_STATE/image-build.log
    mkdir -p "$NODEJOB_CI_STATE"
    : >"$log"
    ci_log "image: debootstrap --variant=minbase bookworm from $mirror (log: $log)"
    if ! debootstrap --variant=minbase bookworm "$rootfs" "$mirror" </dev/null >>"$log" 2>&1; then
        _ci_tail "$log"
        rm -rf "$work"
        ci_die "debootstrap failed (log: $log)"
    fi
    ci_log "image: installing python3 inside (chroot apt-get)"
    cp -L /etc/resolv.conf "$rootfs/etc/resolv.conf"
    mount -t proc proc "$rootfs/proc"
    local ok=1
    # python3-minimal lacks most of the stdlib (json, asyncio, ssl...): install python3.
    chroot "$rootfs" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
        sh -euxc '
            apt-get update -q
            apt-get install -y -q --no-install-recommends python3 ca-certificates
            apt-get clean
            useradd --uid 1000 --user-group --create-home --shell /bin/sh nodejob
        ' </dev/null >>"$log" 2>&1 || ok=0
    umount "$rootfs/proc" || umount -l "$rootfs/proc"
    if ((!ok)); then
        _ci_tail "$log"
        rm -rf "$work"
        ci_die "installing python3 in the image root failed (log: $log)"
    fi
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/debconf/*-old \
        "$rootfs"/var/log/* "$rootfs"/tmp/* "$rootfs"/root/.cache "$rootfs"/usr/share/doc/* \
        "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/*
    : >"$rootfs/etc/resolv.conf" # docker supplies its own at run time
    if ! tar --numeric-owner -C "$rootfs" -cf "$work/rootfs.tar" . || ! mv "$work/rootfs.tar" "$tarball"; then
        rm -rf "$work"
        ci_die "cannot write $tarball"
    fi
    rm -rf "$work"
}

# Check that the image runs python3 with the stdlib as the non-root user, read-only, offline.
ci_image_verify() {
    local out
    out=$(docker run --rm --read-only --network none "$NODEJOB_CI_IMAGE" python3 -I -c '
import json, asyncio, ssl, subprocess, os, sys
assert os.getuid() == 1000 and os.getgid() == 1000, (os.getuid(), os.getgid())
print(sys.version.split()[0], os.getuid())' 2>&1) || {
        echo "$out" >&2
        ci_die "the image $NODEJOB_CI_IMAGE failed its check (python3 -I as uid 1000, --read-only, --network none)"
    }
    CI_NOTE="${CI_NOTE:+$CI_NOTE; }checked: python $out (uid), --read-only --network none"
}

# Make sure the image exists: present -> nothing; cached tarball -> import; else build, import.
ci_image_ensure() {
    local want=$NODEJOB_CI_IMAGE_RECIPE have tarball lock_fd
    tarball=$NODEJOB_CI_CACHE/image/nodejob-test-python-bookworm.r$NODEJOB_CI_ROOTFS_RECIPE.tar
    have=$(_ci_image_recipe_of)
    if [[ $have == "$want" ]]; then
        CI_NOTE="$NODEJOB_CI_IMAGE present"
        [[ -n ${1:-} ]] && ci_image_verify # "verify" argument: check it anyway
        return 0
    fi
    mkdir -p "${tarball%/*}"
    exec {lock_fd}>"$NODEJOB_CI_CACHE/image/.lock"
    flock -x "$lock_fd"
    if [[ $(_ci_image_recipe_of) == "$want" ]]; then # made by another run while we waited
        exec {lock_fd}>&-
        CI_NOTE="$NODEJOB_CI_IMAGE present (made by another run)"
        return 0
    fi
    if [[ -s $tarball ]]; then
        CI_NOTE="imported the cached $tarball"
    else
        ci_build_rootfs "$tarball"
        CI_NOTE="built with debootstrap, cached as $tarball"
    fi
    local old_id
    old_id=$(docker image inspect --format '{{.Id}}' "$NODEJOB_CI_IMAGE" 2>/dev/null) || old_id=""
    docker import \
        --change 'USER nodejob' \
        --change 'WORKDIR /home/nodejob' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change "ENV NODEJOB_TEST_IMAGE_RECIPE=$want" \
        --change 'CMD ["python3"]' \
        --message "nodejob test image, recipe $want (tests/services)" \
        "$tarball" "$NODEJOB_CI_IMAGE" >/dev/null || ci_die "docker import $tarball failed"
    exec {lock_fd}>&-
    # the stale image, now untagged (fails harmlessly if a container still uses it)
    [[ -z $old_id ]] || docker image rm "$old_id" >/dev/null 2>&1 || true
    ci_image_verify
}

# ---------------------------------------------------------------------------- ray

# The venv that holds Ray (kept apart from the project's python: ~400 MB, its own pins).
ci_ray_venv() {
    local venv=$NODEJOB_CI_RAY_VENV stamp log
    stamp=$venv/.nodejob-ci-spec
    if [[ -x $venv/bin/ray && -f $stamp && $(cat "$stamp") == "$NODEJOB_CI_RAY_SPEC" ]]; then
        CI_NOTE="cached $venv ($NODEJOB_CI_RAY_SPEC)"
        return 0
    fi
    log=$NODEJOB_CI_STATE/ray-venv.log
    mkdir -p "$NODEJOB_CI_STATE" "${venv%/*}"
    rm -rf "$venv"
    if ! { python3 -m venv "$venv" &&
        "$venv/bin/python" -m pip install --progress-bar off "$NODEJOB_CI_RAY_SPEC"; } </dev/null >"$log" 2>&1; then
        _ci_tail "$log"
        rm -rf "$venv"
        ci_die "creating the Ray venv failed (log: $log)"
    fi
    echo "$NODEJOB_CI_RAY_SPEC" >"$stamp"
    CI_NOTE="created $venv with $NODEJOB_CI_RAY_SPEC"
}

ci_http_ok() { # ci_http_ok URL: does it answer 2xx within 3 s?
    python3 -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=3).read()' "$1" 2>/dev/null
}

# Start a one-node Ray head unless its dashboard already answers. Sets CI_RAY_STARTED=1 when
# it started one.
ci_ray_start() {
    CI_RAY_STARTED=0
    if ci_http_ok "$NODEJOB_CI_RAY_DASHBOARD/api/version"; then
        CI_NOTE="already running ($NODEJOB_CI_RAY_DASHBOARD)"
        return 0
    fi
    local log=$NODEJOB_CI_STATE/ray-start.log tmp=$NODEJOB_CI_STATE/ray timeout=${NODEJOB_CI_RAY_TIMEOUT:-90} deadline
    mkdir -p "$tmp"
    # No head runs, so old sessions are dead: keep the newest two (their logs), drop the rest.
    find "$tmp" -mindepth 1 -maxdepth 1 -type d -name 'session_2*' -printf '%T@ %p\n' |
        sort -rn | tail -n +3 | cut -d' ' -f2- | xargs -r rm -rf
    # Counted as ours from before the start: a run interrupted during 'ray start' still stops it.
    CI_RAY_STARTED=1
    ci_own_add ray
    # Not activating the venv: jobs' entrypoints inherit the head's PATH, so 'python3' in an
    # entrypoint stays the project's python3 (where nodejob is installed), not the Ray venv's.
    # RAY_JOB_START_TIMEOUT_SECONDS: a job that cannot start (say it asks for a GPU) fails after
    # that long instead of staying PENDING for 15 min; a PENDING job ignores stop requests.
    if ! (RAY_USAGE_STATS_ENABLED=0 RAY_JOB_START_TIMEOUT_SECONDS=${NODEJOB_CI_RAY_JOB_START_TIMEOUT:-60} _ci_detach "$NODEJOB_CI_RAY_VENV/bin/ray" start --head \
        --dashboard-host 127.0.0.1 --dashboard-port 8265 --num-cpus 2 \
        --temp-dir "$tmp" --disable-usage-stats) </dev/null >"$log" 2>&1; then
        _ci_tail "$log"
        ci_die "ray start --head failed (log: $log)"
    fi
    deadline=$(($(_ci_us) + timeout * 1000000))
    until ci_http_ok "$NODEJOB_CI_RAY_DASHBOARD/api/version"; do
        if (($(_ci_us) > deadline)); then
            _ci_tail "$log"
            _ci_tail "$tmp/session_latest/logs/dashboard.log"
            ci_die "the Ray dashboard did not answer $NODEJOB_CI_RAY_DASHBOARD/api/version within ${timeout}s"
        fi
        sleep 0.3
    done
    CI_NOTE="started a Ray head, dashboard $NODEJOB_CI_RAY_DASHBOARD (temp dir $tmp)"
}

ci_ray_stop() {
    local log=$NODEJOB_CI_STATE/ray-stop.log
    if [[ ! -x $NODEJOB_CI_RAY_VENV/bin/ray ]]; then
        CI_NOTE="no Ray venv"
        return 0
    fi
    "$NODEJOB_CI_RAY_VENV/bin/ray" stop </dev/null >"$log" 2>&1 || {
        _ci_tail "$log"
        return 1
    }
    CI_NOTE="ray stop"
}
