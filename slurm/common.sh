# Shared by the batch scripts in slurm/ (sourced, not run). Everything Slurm-specific about running a
# piip6b step lives here: where the log goes, how signals reach the ranks, when the job requeues.
#
# Behaviour (measured on Slurm 22.05; see tests/test_slurm_*.py):
# - `--signal=B:USR1@N` (or `scancel --signal=USR1 --batch`) reaches only this batch shell. The trap
#   below passes it to srun, which forwards USR1 to every task within milliseconds. The trainer only
#   sets a flag, checkpoints at the next step boundary and exits 75 (EX_TEMPFAIL).
# - SIGTERM is NOT forwarded: srun treats it as "cancel the step" and kills the tasks. When Slurm
#   ends a job (time limit, preemption, scancel) it sends SIGTERM to the tasks itself, and the
#   trainer treats that like USR1 if it gets KillWait seconds to save.
# - Exit code 75, or any failure after a USR1 (a rank that had not yet installed its handler, or
#   was past its teardown, dies of the signal; with --kill-on-bad-exit the first rank to exit 75
#   gets the others terminated), requeues the job with `scontrol requeue`. The requeued job resumes
#   from the newest complete checkpoint in the run directory, named by the experiment, not the job.
#   A SIGTERM seen by this shell means Slurm itself is ending the job (scancel, time limit,
#   preemption): no requeue from here, which would undo a user's scancel.
# - Any other failure ends the job with a message; srun's own "task N: ..." lines name the rank
#   that failed first. srun --kill-on-bad-exit stops the other ranks at once (measured: the job
#   ends ~1-6 s after a rank is SIGKILLed) instead of leaving them blocked in a collective until
#   the collective timeout or the time limit.

PIIP6B_EXIT_PREEMPTED=75
PYTHON=${PYTHON:-python}
# The per-task entry (a script of this checkout, run by path; the batch scripts cd to the checkout).
PIIP6B_LAUNCH=${PIIP6B_LAUNCH:-$PWD/launch/rank.py}
export PYTHONUNBUFFERED=1
# One intra-op thread pool per rank sized to its CPUs, not to the whole node.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}

piip6b_log() {
    echo "[$(date '+%F %T')] slurm job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): $*"
}

# piip6b_split_args DEFAULT_CONFIG "$@": sets CONFIG and ARGS (the key=value overrides).
# The first argument is the config when it names a YAML file; otherwise $CONFIG or the default.
# $OVERRIDES (space-separated) comes before the command-line overrides, which win.
piip6b_split_args() {
    local default_config=$1
    shift
    CONFIG=${CONFIG:-$default_config}
    if [[ $# -gt 0 && ( $1 == *.yaml || $1 == *.yml ) ]]; then
        CONFIG=$1
        shift
    fi
    local extra=()
    read -r -a extra <<<"${OVERRIDES:-}"  # split on spaces, no globbing of `[64]`-style values
    ARGS=("${extra[@]}" "$@")
    if [[ ${SLURM_RESTART_COUNT:-0} -gt 0 ]]; then
        # A requeued job continues its own progress: an explicit resume point given at submission
        # would send every restart back to it. Auto-resume picks the newest complete checkpoint.
        local kept=() arg
        for arg in "${ARGS[@]}"; do
            if [[ $arg == checkpoint.resume=* ]]; then
                piip6b_log "requeued: ignoring $arg, resuming from the run's newest checkpoint"
            else
                kept+=("$arg")
            fi
        done
        ARGS=("${kept[@]}")
    fi
}

# piip6b_run_dir CONFIG OVERRIDES...: the experiment's run directory (as the trainer resolves it).
piip6b_run_dir() {
    local arg run_dir=""
    for arg in "${@:2}"; do
        [[ $arg == run_dir=* ]] && run_dir=${arg#run_dir=}
    done
    if [[ -n $run_dir ]]; then
        echo "$run_dir"
    else
        "$PYTHON" "$PIIP6B_LAUNCH" --print-run-dir "$@"
    fi
}

# piip6b_log_to RUN_DIR: from here on, this shell's and every rank's output goes to
# RUN_DIR/logs/slurm-<job id>.out. sbatch cannot open a file in a folder that does not exist yet
# (the job fails before the script runs), so #SBATCH --output only catches what happens before.
piip6b_log_to() {
    local log_dir="$1/logs"
    mkdir -p "$log_dir"
    local log_file="$log_dir/slurm-${SLURM_JOB_ID:-local}.out"
    piip6b_log "logging to $log_file"
    exec >>"$log_file" 2>&1
    piip6b_log "started on ${SLURM_JOB_NODELIST:-$(hostname)} ($PWD)"
}

_piip6b_got_usr1=""
_piip6b_got_term=""

_piip6b_forward_usr1() {
    _piip6b_got_usr1=1
    piip6b_log "received USR1 (time limit or preemption): asking the ranks to checkpoint and exit"
    kill -USR1 "$1" 2>/dev/null || true
}

_piip6b_note_term() {
    _piip6b_got_term=1
    piip6b_log "received TERM: Slurm is ending the job and signals the ranks itself"
}

# piip6b_srun PIIP6B_ARGS...: run `python launch/rank.py PIIP6B_ARGS` as one srun step, one task per
# GPU, then exit the batch script: 0 on success, requeue on preemption, the step's code on failure.
piip6b_srun() {
    srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
        "$PYTHON" "$PIIP6B_LAUNCH" "$@" &
    local srun_pid=$! rc
    trap "_piip6b_forward_usr1 $srun_pid" USR1
    trap _piip6b_note_term TERM
    # A trapped signal interrupts `wait`; keep waiting until srun itself has ended.
    while :; do
        wait "$srun_pid" && rc=0 || rc=$?
        if [[ $rc -gt 128 ]] && kill -0 "$srun_pid" 2>/dev/null; then
            continue
        fi
        break
    done
    trap - USR1 TERM
    piip6b_finish "$rc"
}

piip6b_finish() {
    local rc=$1
    if [[ $rc -eq 0 ]]; then
        piip6b_log "finished"
        exit 0
    fi
    if [[ -n $_piip6b_got_term ]]; then
        # scancel, a time limit or preemption: Slurm decides (a preempting cluster with
        # PreemptMode=REQUEUE requeues by itself); requeueing here would undo a user's scancel.
        piip6b_log "step exited with $rc while Slurm was ending the job; not requeueing. Submit the" \
            "same command again to resume from the newest complete checkpoint in $RUN_DIR"
        exit "$rc"
    fi
    if [[ $rc -eq $PIIP6B_EXIT_PREEMPTED || -n $_piip6b_got_usr1 ]]; then
        piip6b_log "step exited with $rc after a checkpoint request: requeueing"
        if scontrol requeue "$SLURM_JOB_ID"; then
            exit 0
        fi
        piip6b_log "scontrol requeue failed (is requeueing disabled on this cluster?): submit the same" \
            "command again to resume from the newest checkpoint in $RUN_DIR"
        exit "$PIIP6B_EXIT_PREEMPTED"
    fi
    local how="exit code $rc"
    [[ $rc -gt 128 ]] && how="signal $((rc - 128)) ($(kill -l $((rc - 128)) 2>/dev/null || echo '?'))"
    piip6b_log "FAILED: srun ended with $how. The first 'srun: error: ... task N'" \
        "line above names the rank that failed first (out of memory, a lost node, or the error in" \
        "its log); srun then stopped the other ranks. Fix the cause and submit the same command" \
        "again: the run resumes from the newest complete checkpoint in $RUN_DIR"
    exit "$rc"
}
