# Shared by the bench/gpu_*.sh session scripts (sourced, not run): the work directory and
# launch(), which starts a job detached from the device call (a call lasts at most 10 min;
# the job outlives it while the machine stays warm) with its log in $W/logs/NAME.log.
W=${BENCH_WORK:-/tmp/bench}
mkdir -p "$W/logs"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}

launch() {  # name, command...
    local name=$1
    shift
    setsid nohup bash -c "$*" > "$W/logs/$name.log" 2>&1 < /dev/null &
    echo "$name: pid $!"
}
