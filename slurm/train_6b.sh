#!/bin/bash
# Train a PIIP-H6B model with DeepSpeed ZeRO-3 on a multi-node GPU cluster; preemption-safe.
#
#   sbatch slurm/train_6b.sh [CONFIG.yaml] [key=value ...]
#   CONFIG=configs/... OVERRIDES="optim.lr=1e-4 seed=1" sbatch --nodes=16 slurm/train_6b.sh
#
# Submit from the repository root (or set PIIP6B_ROOT) with the environment that has piip6b
# installed active (or PYTHON=/path/to/python). Command-line #SBATCH options override the header,
# e.g. `sbatch --nodes=16 --time=3-00:00:00 slurm/train_6b.sh`.
#
# The run directory is named by the experiment (runs/<config name>, or run_dir=...), never by the job
# id, so a requeued or resubmitted job finds its checkpoints and resumes. Logs: <run dir>/logs/, after
# the pre-flight (`piip6b check` for the job's ranks), whose output stays in the --output file below.
#
#SBATCH --job-name=piip6b-train
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=2-00:00:00
# USR1 to this shell 10 min before the time limit: one step, a ~100 GB sharded ZeRO-3 save, and
# Slurm's signal timer (checked about once a minute; measured up to 7 s late on an idle cluster).
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
# sbatch fails a job whose output folder does not exist, so this file only holds the lines before
# the log moves into the run directory (piip6b_log_to).
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail
cd "${PIIP6B_ROOT:-${SLURM_SUBMIT_DIR:-.}}" || exit 1
source slurm/common.sh

piip6b_split_args configs/detection/piip_h6b_maskrcnn_1x_coco.yaml "$@"
# Pre-flight for this job's world size, in this shell, before srun starts a rank and before the run
# dir is touched: a missing weight file, a wrong data.root or a full disk ends the job here with one
# line in this log (slurm-<name>-<job id>.out), not after every node has started DeepSpeed.
piip6b_log "pre-flight: $CONFIG ${ARGS[*]} on ${SLURM_NTASKS:-1} ranks"
"$PYTHON" "$PIIP6B_LAUNCH" check "$CONFIG" "${ARGS[@]}" --world-size "${SLURM_NTASKS:-1}" \
    --nodes "${SLURM_JOB_NUM_NODES:-1}" || { piip6b_log "pre-flight failed: nothing was started"; exit 2; }
RUN_DIR=$(piip6b_run_dir "$CONFIG" "${ARGS[@]}") || exit 2
piip6b_log_to "$RUN_DIR"
piip6b_log "train $CONFIG ${ARGS[*]}"
piip6b_srun train "$CONFIG" "${ARGS[@]}"
