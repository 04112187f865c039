#!/usr/bin/env bash
# A small lr x warm-up sweep of the quickstart LDM on the built-in data (needs the quickstart
# first stage: `make train-autoencoder`). 3 learning rates x 2 warm-ups, 150 steps per job, one
# job after the other; then the report (table, heat map, curves) is copied next to this script.
set -euo pipefail
cd "$(dirname "$0")/../.."
SWEEP=outputs/multiruns/lr_warmup_quickstart
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # one thread: the machine is shared, and 2 threads thrash under load
start=$(date +%s)
.venv/bin/python -m segldm.train -m experiment=quickstart \
  model.base_learning_rate=1e-4,5e-4,2e-3 scheduler.warm_up_steps=0,100 \
  trainer.max_steps=150 trainer.val_check_interval=75 \
  callbacks.model_checkpoint.every_n_train_steps=150 \
  callbacks.sample_grid.every_n_steps=0 callbacks.sample_grid.num_samples=4 callbacks.sample_grid.ddim_steps=20 \
  logger.mlflow.experiment_name=sweeps hydra.sweep.dir="$SWEEP" "$@"
echo "sweep wall time: $(( $(date +%s) - start )) s"
cp "$SWEEP"/report/{runs.md,runs.csv,heatmap.png,curves.png} experiments/sweeps/
