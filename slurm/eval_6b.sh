#!/bin/bash
# Evaluate a trained PIIP-H6B model on the config's validation split, on a GPU cluster.
#
#   sbatch slurm/eval_6b.sh [CONFIG.yaml] [key=value ...]
#   WEIGHTS=exports/h6b.safetensors sbatch slurm/eval_6b.sh configs/segmentation/piip_h6b_512_upernet_80k_ade20k.yaml
#
# WEIGHTS is an exported .safetensors, a checkpoint folder, or a run dir (default: the config's run
# dir, i.e. its newest complete checkpoint). Metrics go to <run dir>/eval-<job id>.json and the log
# to <run dir>/logs/. Same conventions as train_6b.sh; a preempted evaluation is requeued and starts
# over (it keeps no partial state).
#
#SBATCH --job-name=piip6b-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out

set -uo pipefail
cd "${PIIP6B_ROOT:-${SLURM_SUBMIT_DIR:-.}}" || exit 1
source slurm/common.sh

piip6b_split_args configs/detection/piip_h6b_maskrcnn_1x_coco.yaml "$@"
RUN_DIR=$(piip6b_run_dir "$CONFIG" "${ARGS[@]}") || exit 2
WEIGHTS=${WEIGHTS:-$RUN_DIR}
piip6b_log_to "$RUN_DIR"
piip6b_log "eval $CONFIG ${ARGS[*]} with weights $WEIGHTS"
piip6b_srun eval "$CONFIG" "${ARGS[@]}" --weights "$WEIGHTS" --out "$RUN_DIR/eval-${SLURM_JOB_ID}.json"
