# Sourced by the launchers that start each replica as a job of its own
# (LATHE_REPLICA_JOBS=1: launch/mpirun.sh, launch/slurm.sbatch): one
# supervisor per replica starts its job again when it fails, with a limit
# and a doubling delay. docs/launching.md lists the variables.

# lathe_supervise_replica TAG INDEX LOG STOP_FILE COORDINATOR_PID COMMAND...
# Runs COMMAND (output appended to LOG) until it ends because the
# coordinator stopped the replica: exit 0, the coordinator then gone within
# 10 s. An exit 0 while the coordinator serves on counts as a failure (srun
# reports 0 for a step that failed to launch). A failed run is started
# again after LATHE_RESTART_DELAY_S seconds (default 5), the delay doubling up to
# LATHE_RESTART_DELAY_MAX_S (default 300) and counted against
# LATHE_MAX_RESTARTS (default 3); a run that lasted LATHE_RESTART_RESET_S
# seconds (default 600) before failing starts the count and the delay
# afresh. Nothing is started again once STOP_FILE exists or the
# coordinator (COORDINATOR_PID) is gone. Each restart and each give-up is
# one line on stdout, "[TAG] replica INDEX exited RC; …". Returns the last
# exit status.
lathe_supervise_replica() {
  local tag=$1 i=$2 log=$3 stopping=$4 coordinator_pid=$5
  shift 5
  local max=${LATHE_MAX_RESTARTS:-3} first_delay=${LATHE_RESTART_DELAY_S:-5}
  local cap=${LATHE_RESTART_DELAY_MAX_S:-300} reset=${LATHE_RESTART_RESET_S:-600}
  local restarts=0 delay=$first_delay rc started
  while :; do
    started=$SECONDS
    rc=0
    "$@" >>"$log" 2>&1 || rc=$?
    [ -e "$stopping" ] && return "$rc"
    if [ "$rc" = 0 ]; then
      for _ in $(seq 20); do
        kill -0 "$coordinator_pid" 2>/dev/null && [ ! -e "$stopping" ] || return 0
        sleep 0.5
      done
    fi
    if ! kill -0 "$coordinator_pid" 2>/dev/null; then
      echo "[$tag] replica $i exited $rc; the coordinator is gone: not restarted"
      return "$rc"
    fi
    if [ $((SECONDS - started)) -ge "$reset" ]; then
      restarts=0 delay=$first_delay
    fi
    if [ "$restarts" -ge "$max" ]; then
      echo "[$tag] replica $i exited $rc; not restarted (LATHE_MAX_RESTARTS=$max)"
      return "$rc"
    fi
    restarts=$((restarts + 1))
    echo "[$tag] replica $i exited $rc; restart $restarts in $delay s"
    sleep "$delay"
    delay=$((delay * 2 > cap ? cap : delay * 2))
    [ -e "$stopping" ] && return "$rc"
  done
}
