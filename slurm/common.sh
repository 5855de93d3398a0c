# Shared by the batch scripts in slurm/ (sourced, not run). Everything Slurm-specific about running a
# piip6b step lives here: where the log goes, how signals reach the ranks, when the job requeues.
# Sourcing it installs the USR1/TERM traps, so a batch script has them from its first lines.
#
# Behaviour (measured on Slurm 22.05; tests/launch/test_slurm_*.py):
# - `--signal=B:USR1@N` (or `scancel --signal=USR1 --batch`) reaches only this batch shell. The trap
#   below passes it to srun, which forwards USR1 to every task within milliseconds. The trainer only
#   sets a flag, checkpoints at the next step boundary (or stops its evaluation at the next batch)
#   and exits 75 (EX_TEMPFAIL); this script then requeues the job.
# - A USR1 or TERM that arrives before srun has started (e.g. while the run dir is being resolved)
#   is remembered, not fatal: the ranks are not started and the job is requeued (USR1) or ended as
#   Slurm intends (TERM, below). Without the traps bash would die of it, the job would end FAILED,
#   never requeued, with nothing in the run dir's log.
# - SIGTERM to the step's tasks (`scancel --signal=TERM JOB`, no --full/--batch; Slurm's own TERM
#   when it ends the job) reaches the ranks, which treat it like USR1.
# - SIGTERM to srun itself cannot be made graceful: srun answers it with SIGKILL to every task
#   ("srun: forcing job termination"). `scancel --full --signal=TERM` signals srun too, so the
#   ranks die at once and the steps since the last checkpoint are lost; the job is then requeued
#   from that checkpoint. To checkpoint on demand, signal USR1 (`scancel --signal=USR1 --batch JOB`).
#   When Slurm itself ends the job (time limit, scancel, requeue, preemption), srun's SIGKILL waits
#   for the step's own termination: the ranks get KillWait seconds to reach a step boundary, save
#   and exit.
# - Why a TERM came is read from Slurm's record of the job at that moment (`scontrol show job`), and
#   the decision is logged (and a requeue made) at once: Slurm kills this shell KillWait seconds
#   later, often before the step's end would let it speak:
#   a restart count above ours = Slurm requeues the job itself (scontrol requeue, preemption with
#   PreemptMode=REQUEUE): nothing to do here; Reason=TimeLimit = the limit came before the ranks had
#   saved (the USR1 lead was too short): requeue; state COMPLETING with Reason=None = scancel: the
#   user wants the job gone, no requeue; state RUNNING = a signal, not the end of the job (`scancel
#   --full --signal=TERM`, `kill`): requeue when the step died of it. Anything else (a node
#   failure, PreemptMode=CANCEL: not measured here) is left to Slurm, with the state in the line.
# - Exit code 75, or any failure after a USR1 (a rank that had not yet installed its handler, or
#   was past its teardown, dies of the signal; with --kill-on-bad-exit the first rank to exit 75
#   gets the others terminated), requeues the job with `scontrol requeue`. The requeued job resumes
#   from the newest complete checkpoint in the run directory, named by the experiment, not the job;
#   a run that had already finished says so and exits 0.
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

# ------------------------------------------------------------------------------------------ signals
_piip6b_usr1_at=""  # when USR1 arrived (empty: never)
_piip6b_term_at=""  # when TERM arrived
_piip6b_term_cause=""  # why, from Slurm's record (_piip6b_ask_term_cause)
_piip6b_srun_pid=""  # the running step, once there is one
_piip6b_trapped=""  # set by every trap: tells a `wait` cut short by a signal from srun's own end
_piip6b_requeued=""  # set once this script has requeued the job

_piip6b_on_usr1() {
    _piip6b_trapped=1
    _piip6b_usr1_at=$(date '+%F %T')
    if [[ -n $_piip6b_srun_pid ]]; then
        piip6b_log "received USR1 (time limit or preemption): asking the ranks to checkpoint and exit"
        kill -USR1 "$_piip6b_srun_pid" 2>/dev/null || true
    fi
}

_piip6b_on_term() {
    _piip6b_trapped=1
    _piip6b_term_at=$(date '+%F %T')
    _piip6b_term_cause=$(_piip6b_ask_term_cause)
    # Said (and done) now: when Slurm ends the job it kills this shell too, KillWait seconds on,
    # usually as the ranks' own exit ends srun, so a line after the step would never be written.
    local saving="the ranks save if they reach a step boundary within KillWait"
    local resume="the newest complete checkpoint in ${RUN_DIR:-the run dir}/checkpoints"
    case $_piip6b_term_cause in
        requeued)
            piip6b_log "received TERM: Slurm is requeueing the job itself (scontrol requeue or preemption);" \
                "$saving, and the restart resumes from $resume" ;;
        cancelled)
            piip6b_log "received TERM: the job was cancelled (scancel), so it is not requeued; $saving." \
                "Submit the same command again to resume from $resume" ;;
        time_limit)
            piip6b_log "received TERM at the time limit, before the ranks had saved (the USR1 lead," \
                "#SBATCH --signal=B:USR1@SECONDS, is shorter than a step plus a save); $saving." \
                "Requeueing now; the restart resumes from $resume"
            scontrol requeue "$SLURM_JOB_ID" && _piip6b_requeued=1 ;;
        signal)
            piip6b_log "received TERM, but Slurm is not ending the job (scancel --full --signal=TERM, or" \
                "kill): the ranks go on unless srun got it too (it then kills them; see below)" ;;
        *)
            piip6b_log "received TERM: Slurm is ending the job ($_piip6b_term_cause), so this script does" \
                "not requeue it; $saving. Submit the same command again to resume from $resume" ;;
    esac
}

# One word for why TERM came (see the header): requeued, time_limit, cancelled, signal, or
# "ending (JobState=... Reason=...)" for anything else. Asked at once: Slurm kills this shell
# KillWait seconds after the TERM.
_piip6b_ask_term_cause() {
    local record state reason restarts
    if ! record=$(timeout 10 scontrol show job -o "${SLURM_JOB_ID:-}" 2>&1); then
        echo "unknown: scontrol show job failed: ${record:0:200}"
        return
    fi
    state=$(grep -o 'JobState=[^ ]*' <<<"$record") state=${state#JobState=}
    reason=$(grep -o 'Reason=[^ ]*' <<<"$record") reason=${reason#Reason=}
    restarts=$(grep -o 'Restarts=[0-9]*' <<<"$record") restarts=${restarts#Restarts=}
    if (( ${restarts:-0} > ${SLURM_RESTART_COUNT:-0} )); then
        echo requeued
    elif [[ $reason == TimeLimit ]]; then
        echo time_limit
    elif [[ $state == RUNNING ]]; then
        echo signal
    elif [[ ($state == COMPLETING || $state == CANCELLED) && $reason == None ]]; then
        echo cancelled
    else
        echo "ending (JobState=$state Reason=$reason)"
    fi
}

trap _piip6b_on_usr1 USR1
trap _piip6b_on_term TERM

# ------------------------------------------------------------------------------------------ the step
# piip6b_srun PIIP6B_ARGS...: run `python launch/rank.py PIIP6B_ARGS` as one srun step, one task per
# GPU, then exit the batch script (piip6b_finish).
piip6b_srun() {
    if [[ -n $_piip6b_term_at ]]; then
        piip6b_finish "$PIIP6B_EXIT_PREEMPTED" \
            "received TERM ($_piip6b_term_cause) at $_piip6b_term_at, before the ranks started"
    fi
    if [[ -n $_piip6b_usr1_at ]]; then
        # The job is about to reach its time limit or be preempted: starting the ranks now would
        # only build the model to stop it again before its first step.
        piip6b_log "received USR1 at $_piip6b_usr1_at, before the ranks started: not starting them;" \
            "requeueing. (If this happens on every start, the job's --time is shorter than its" \
            "--signal=B:USR1@SECONDS lead.)"
        _piip6b_requeue
    fi
    srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" \
        "$PYTHON" "$PIIP6B_LAUNCH" "$@" &
    _piip6b_srun_pid=$!
    local rc
    # A trapped signal cuts `wait` short (status 128+signal, then the trap runs); wait again until
    # srun itself has ended. Bash keeps the status of a child that ended meanwhile for that wait.
    while :; do
        _piip6b_trapped=""
        wait "$_piip6b_srun_pid" && rc=0 || rc=$?
        [[ -n $_piip6b_trapped ]] || break
    done
    _piip6b_srun_pid=""
    if [[ $rc -eq $PIIP6B_EXIT_PREEMPTED ]]; then
        piip6b_finish "$rc" "step exited with $rc (the ranks checkpointed when signalled)"
    fi
    piip6b_finish "$rc"
}

# The newest complete checkpoint as the trainer left it (its `latest` file), for the messages.
_piip6b_newest_checkpoint() {
    local tag
    if tag=$(cat "${RUN_DIR:-.}/checkpoints/latest" 2>/dev/null) && [[ -n $tag ]]; then
        echo "$RUN_DIR/checkpoints/$tag"
    else
        echo "none yet (the run starts again from step 0)"
    fi
}

_piip6b_requeue() {
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    piip6b_log "scontrol requeue failed (is requeueing disabled on this cluster?): submit the same" \
        "command again to resume from the newest complete checkpoint: $(_piip6b_newest_checkpoint)"
    exit "$PIIP6B_EXIT_PREEMPTED"
}

# piip6b_finish RC [WHAT]: end the batch script after the step (WHAT says what happened, default
# "step exited with RC"): exit 0, requeue, or exit RC with a line saying why and what to do.
piip6b_finish() {
    local rc=$1 what=${2:-"step exited with $1"} newest
    if [[ $rc -eq 0 ]]; then
        piip6b_log "finished"
        exit 0
    fi
    newest=$(_piip6b_newest_checkpoint)
    case $_piip6b_term_cause in
        "" | signal) ;;  # decided below
        time_limit)
            if [[ -z $_piip6b_requeued ]]; then
                piip6b_log "$what at the time limit: requeueing; the restart resumes from $newest"
                _piip6b_requeue
            fi
            piip6b_log "$what; the job was requeued at the time limit: the restart resumes from $newest"
            exit 0 ;;
        *)
            piip6b_log "$what (Slurm is ending the job, see the TERM line above); newest complete checkpoint: $newest"
            exit "$rc" ;;
    esac
    if [[ $rc -eq $PIIP6B_EXIT_PREEMPTED ]]; then
        piip6b_log "$what: requeueing; the run resumes from the newest complete checkpoint: $newest"
        _piip6b_requeue
    elif [[ $_piip6b_term_cause == signal && $rc -gt 128 ]]; then
        piip6b_log "$what after a TERM that did not come from Slurm ending the job (scancel --full" \
            "--signal=TERM, or kill): srun answers its own TERM with SIGKILL to the ranks, so the" \
            "steps since the last checkpoint are lost. Requeueing from the newest complete" \
            "checkpoint: $newest. To checkpoint first, send USR1: scancel --signal=USR1 --batch $SLURM_JOB_ID"
        _piip6b_requeue
    elif [[ -n $_piip6b_usr1_at ]]; then
        piip6b_log "$what after USR1 (a rank that had not yet installed its handler, or was past" \
            "its teardown, died of the signal): requeueing from the newest complete checkpoint: $newest"
        _piip6b_requeue
    fi
    local how="exit code $rc"
    [[ $rc -gt 128 ]] && how="signal $((rc - 128)) ($(kill -l $((rc - 128)) 2>/dev/null || echo '?'))"
    piip6b_log "FAILED: srun ended with $how. The first 'srun: error: ... task N'" \
        "line above names the rank that failed first (out of memory, a lost node, or the error in" \
        "its log); srun then stopped the other ranks. Fix the cause and submit the same command" \
        "again: the run resumes from the newest complete checkpoint: $newest"
    exit "$rc"
}
