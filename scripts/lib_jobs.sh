# Sourced by the compile checks (check_cuda_compile.sh, check_aarch64_compile.sh): runs commands
# in the background, at most JOBS_MAX at once (the compilers are single-threaded; CI has 2 cores),
# and reports each in the order it was started, once it is done:
#   <JOBS_TAG>: OK   <name> (<seconds> s)     then its output (warnings), if any
#   <JOBS_TAG>: FAIL <name> (<seconds> s)     then its error lines (or its last lines)
#
#   source scripts/lib_jobs.sh
#   JOBS_TAG=check_x JOBS_DIR="$TMP"
#   jobs_run "csrc/a.cpp" g++ -c csrc/a.cpp -o "$TMP/a.o"
#   jobs_wait_all || status=1          # 1 when any job since the last jobs_wait_all failed
#
# All state lives in the _jobs_* globals below; nothing reaches into the caller's variables.
JOBS_MAX="${JOBS_MAX:-2}"
JOBS_TAG="${JOBS_TAG:-jobs}"
JOBS_DIR="${JOBS_DIR:-}"
_jobs_pids=()
_jobs_names=()
_jobs_failed=0
_jobs_count=0

# jobs_run <name> <command...>: starts the command, its output to a log under JOBS_DIR; first waits
# for the oldest job when JOBS_MAX are running.
jobs_run() {
  local name="$1"
  shift
  if [ -z "$JOBS_DIR" ]; then
    echo "lib_jobs: JOBS_DIR is not set (a temporary directory for the jobs' logs)" >&2
    return 2
  fi
  while [ "${#_jobs_pids[@]}" -ge "$JOBS_MAX" ]; do _jobs_wait_oldest; done
  local log="$JOBS_DIR/job$_jobs_count.log"
  (
    start=$SECONDS
    rc=0
    "$@" || rc=$?
    echo "$((SECONDS - start))" >"$log.seconds"
    exit "$rc"
  ) >"$log" 2>&1 &
  _jobs_pids+=("$!")
  _jobs_names+=("$_jobs_count $name")
  _jobs_count=$((_jobs_count + 1))
}

# jobs_wait_all: waits for every job and reports them; returns 1 when any failed since the last call.
jobs_wait_all() {
  while [ "${#_jobs_pids[@]}" -gt 0 ]; do _jobs_wait_oldest; done
  local failed="$_jobs_failed"
  _jobs_failed=0
  [ "$failed" = 0 ]
}

_jobs_wait_oldest() {
  local pid="${_jobs_pids[0]}" entry="${_jobs_names[0]}"
  _jobs_pids=("${_jobs_pids[@]:1}")
  _jobs_names=("${_jobs_names[@]:1}")
  local index="${entry%% *}" name="${entry#* }"
  local log="$JOBS_DIR/job$index.log" seconds="?"
  if wait "$pid"; then
    seconds="$(cat "$log.seconds" 2>/dev/null || echo "?")"
    echo "$JOBS_TAG: OK   $name ($seconds s)"
    cat "$log"
  else
    seconds="$(cat "$log.seconds" 2>/dev/null || echo "?")"
    echo "$JOBS_TAG: FAIL $name ($seconds s)"
    if grep -qE "error|Error" "$log"; then
      grep -E "error|Error" "$log" | head -n 30 || true
    else
      tail -n 30 "$log"
    fi
    _jobs_failed=1
  fi
}
