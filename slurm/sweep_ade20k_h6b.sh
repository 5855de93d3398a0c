#!/bin/bash
# Array job: PIIP-H6B UperNet on ADE20K at each InternViT-6B input size of the paper's sweep
# (6B branch at 192/256/384/512 px, ViT-H at 512 px), one training run per array task.
#
#   sbatch slurm/sweep_ade20k_h6b.sh [key=value ...]        # all four sizes
#   sbatch --array=3 slurm/sweep_ade20k_h6b.sh               # only 512/512
#   SWEEP_CONFIGS="a.yaml b.yaml" sbatch --array=0-1 slurm/sweep_ade20k_h6b.sh
#
# Each task trains one config (its own name, so its own run dir and checkpoints) with the same
# preemption handling as train_6b.sh; the overrides apply to every task.
#
#SBATCH --job-name=piip6b-ade20k-h6b-sweep
#SBATCH --array=0-3
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=2-00:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%A_%a.out

set -uo pipefail
cd "${PIIP6B_ROOT:-${SLURM_SUBMIT_DIR:-.}}" || exit 1
source slurm/common.sh

if [[ -n ${SWEEP_CONFIGS:-} ]]; then
    # shellcheck disable=SC2206  # a space-separated list by design
    SWEEP=($SWEEP_CONFIGS)
else
    SWEEP=(configs/segmentation/piip_h6b_{192,256,384,512}_upernet_80k_ade20k.yaml)
fi
TASK=${SLURM_ARRAY_TASK_ID:?submit with sbatch --array: SLURM_ARRAY_TASK_ID picks the config}
if (( TASK < 0 || TASK >= ${#SWEEP[@]} )); then
    echo "array index $TASK has no config; the sweep has ${#SWEEP[@]}: --array=0-$(( ${#SWEEP[@]} - 1 ))" >&2
    exit 2
fi
CONFIG=${SWEEP[$TASK]}
ARGS=("$@")
for arg in "${ARGS[@]}"; do
    if [[ $arg == run_dir=* || $arg == name=* ]]; then
        echo "$arg would give every sweep task the same run dir; each config names its own" >&2
        exit 2
    fi
done
RUN_DIR=$(piip6b_run_dir "$CONFIG" "${ARGS[@]}") || exit 2
piip6b_log_to "$RUN_DIR"
piip6b_log "sweep task $TASK of ${#SWEEP[@]}: train $CONFIG ${ARGS[*]}"
piip6b_srun train "$CONFIG" "${ARGS[@]}"
