#!/usr/bin/env bash
# The checks that need a GPU, for a CUDA machine: the `cuda` tests (optimizers on CUDA against the
# CPU for-loop, fp16 + HMAdamW through the CLI) and, with 2+ GPUs, `lowmem fit` under DDP (NCCL)
# and FSDP2 for an optimizer of each kind. Usage: scripts/gpu_check.sh   (after `make install`)
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$BIN/python -m pytest -q -m cuda tests/test_cuda.py
gpus=$($BIN/python -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
  common=(--trainer.accelerator=gpu --trainer.devices=2 --trainer.max_steps=20 --trainer.limit_val_batches=2
          --trainer.enable_progress_bar=false)
  for optimizer in HMAdamW SlimAdamW AdamMini; do
    timeout -s KILL 300 $BIN/lowmem fit --config configs/cnn_adamw.yaml "${common[@]}" \
      --model.init_args.optimizer=lowmem.strategies.$optimizer --trainer.strategy=ddp
    timeout -s KILL 300 $BIN/lowmem fit --config configs/cnn_adamw.yaml "${common[@]}" \
      --model.init_args.optimizer=lowmem.strategies.$optimizer \
      --trainer.strategy=lightning.pytorch.strategies.ModelParallelStrategy \
      --trainer.strategy.data_parallel_size=2 --trainer.strategy.tensor_parallel_size=1
  done
else
  echo "one GPU: the multi-GPU (NCCL) checks were not run"
fi
echo "gpu_check: all passed"
