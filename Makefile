# make demo: set up and run the main job on the built-in corpus.  make test: set up and run every test.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
DEBIAN_PACKAGES := $(shell cat cluster/debian-packages.txt)  # the built-in corpus and CLIPPO's text renderer
IMAGE ?= ghcr.io/your-org/clipforge:latest  # the cluster image (cluster/Dockerfile) every cluster config runs
TEST_DEBIAN_PACKAGES := chromium  # the MLflow UI test's headless browser
STAMP := $(VENV)/.installed

.PHONY: demo bootstrap test test-fast setup system-deps test-deps image ingest pretrain evaluate clip-filter altclip clipcap caption mlflow-ui bench clean

demo: setup  ## the whole chain on the built-in corpus: ingest, pretrain, evaluate, AltCLIP, ClipCap, caption (a re-run skips what is unchanged)
	$(PY) pipelines/end_to_end.py $(ARGS)

bootstrap: setup  ## DataComp-style: train on the salted corpus, filter it with that model, train again, compare
	$(PY) pipelines/end_to_end.py corpus=emoji_salted \
	    stages=[ingest,pretrain,evaluate,clip_filter,pretrain_filtered,evaluate_filtered] $(ARGS)

test: setup test-deps
	$(PY) -m pytest -q

test-fast: setup test-deps  ## skip the slow end-to-end tests
	$(PY) -m pytest -q -m "not slow"

setup: system-deps $(STAMP)

# Debian packages (the built-in corpus and CLIPPO need DEBIAN_PACKAGES, the tests also Chromium): installed when
# we are root, else one line says which.
define debian_packages
@missing=""; for p in $(1); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
if [ -n "$$missing" ]; then \
  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
  else echo "missing Debian packages:$$missing (run: sudo apt-get install$$missing)"; exit 1; fi; fi
endef

system-deps:
	$(call debian_packages,$(DEBIAN_PACKAGES))

# CLIP_benchmark's wheel, whose `build` code a test runs over our evaluation results (tests/helpers.py).
CLIP_BENCHMARK_WHEEL := .cache/clip_benchmark/clip_benchmark-1.6.2-py2.py3-none-any.whl

test-deps: $(CLIP_BENCHMARK_WHEEL)
	$(call debian_packages,$(TEST_DEBIAN_PACKAGES))

$(CLIP_BENCHMARK_WHEEL): | $(VENV)/bin/python
	$(PY) -m pip download -q --no-deps -d $(dir $@) clip-benchmark==1.6.2

$(VENV)/bin/python:
	python3 -m venv $(VENV)

# The exact versions of constraints.txt; the demo extra is the built-in corpus' sources.
$(STAMP): pyproject.toml constraints.txt | $(VENV)/bin/python
	$(PY) -m pip install -q --upgrade pip
	# torch first, alone: pip then takes the pinned CPU build instead of resolving a CUDA one.
	$(PY) -m pip install -q -c constraints.txt torch
	$(PY) -m pip install -q -c constraints.txt -e ".[demo,test]"
	touch $(STAMP)

image:  ## build the cluster image (cluster/Dockerfile) as $(IMAGE); push it to your registry
	docker build -f cluster/Dockerfile -t $(IMAGE) .

ingest: setup
	$(PY) pipelines/ingest.py $(ARGS)

pretrain: setup
	$(PY) pipelines/pretrain_clip.py $(ARGS)

evaluate: setup
	$(PY) pipelines/evaluate.py $(ARGS)

clip-filter: setup  ## score the salted corpus with the latest clipforge-clip and keep the best pairs
	$(PY) pipelines/clip_filter.py $(ARGS)

altclip: setup  ## distil a multilingual AltCLIP from the latest clipforge-clip (run make demo first)
	$(PY) pipelines/distill_altclip.py $(ARGS)

clipcap: setup  ## train a ClipCap captioner on the latest clipforge-clip (run make demo first)
	$(PY) pipelines/train_clipcap.py $(ARGS)

# The shards make demo ingested (its workflow state names them), else those make ingest writes.
DEMO_SHARDS = $(shell $(PY) -c "import json; print(json.load(open('data/workflow/emoji/state.json'))['ingest']['outputs']['shards'])" 2>/dev/null || echo data/shards/emoji)

caption: setup  ## caption the demo's shards (or DATA=<shards or image folder>) with the latest clipforge-clipcap
	$(PY) pipelines/caption.py data=$(or $(DATA),$(DEMO_SHARDS)) $(ARGS)

mlflow-ui: setup  ## the MLflow server over this directory's store (sqlite) and artifacts: http://127.0.0.1:5000
	$(VENV)/bin/mlflow server --backend-store-uri sqlite:///mlflow.db --default-artifact-root ./mlruns \
	    --host 127.0.0.1 --port 5000

bench: setup
	$(PY) benchmarks/ingest_throughput.py
	$(PY) benchmarks/dedup_scale.py
	$(PY) benchmarks/train_throughput.py
	$(PY) benchmarks/clippo_patch_size.py
	$(PY) benchmarks/zero_memory_profile.py --stage 0
	$(PY) benchmarks/zero_memory_profile.py --stage 3
	$(PY) benchmarks/filip_token_selection.py
	$(PY) benchmarks/versus_open_clip.py
	$(PY) benchmarks/demo_recipe.py
	$(PY) benchmarks/object_store_chain.py
	$(PY) benchmarks/caption_decoding.py
	$(PY) benchmarks/dynamic_padding.py
	$(PY) benchmarks/grad_cache_memory.py
	$(PY) benchmarks/ray_data_reads.py

clean:
	rm -rf data outputs mlruns mlflow.db
