#!/usr/bin/env bash
# Multi-node training under SLURM with torchrun, one task per node, 8 GPUs per node.
#
#   sbatch --nodes=16 configs/launch/slurm_mm1.sh configs/mm1-7b-moe.yaml \
#       parallel.tensor_parallel=2 parallel.pipeline_parallel=2 parallel.expert_parallel=8
#
# Layouts that fit (check with `mm1-moe info --config <yaml> --tp T --pp P --ep E --dp D`):
#   mm1-30b      TP 8, PP 4, sequence parallel      (~28B: weights+grads+optimizer+activations)
#   mm1-3b-moe   TP 1, PP 2, EP 8                   (64 experts, every 2nd layer)
#   mm1-7b-moe   TP 2, PP 2, EP 8, sequence parallel (32 experts, every 4th layer)
# The data-parallel size is what is left: world size / (TP x PP).
#SBATCH --job-name=mm1-moe
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

CONFIG=${1:?usage: sbatch --nodes=N slurm_mm1.sh CONFIG.yaml [dotted.key=value ...]}
shift

MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=8
export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron's TP comm/compute overlap needs ordered streams

srun torchrun \
    --nnodes="$SLURM_JOB_NUM_NODES" --nproc-per-node=8 \
    --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
    -m mm1_moe.cli train --config "$CONFIG" \
    train.output_dir="runs/${SLURM_JOB_NAME}-${SLURM_JOB_ID}" "$@"
