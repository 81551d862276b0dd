# fedcrm: the two commands a newcomer runs are `make demo` and `make test`.
# Both create (once) and reuse the virtual environment in .venv/.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# One wheel cache for every lock-file version (tools/setup-venv): a rerun, or a fresh clone on the same machine,
# installs offline, and a changed lock file downloads only the wheels it does not already hold.
LOCK_HASH := $(shell cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)
WHEELHOUSE := $(HOME)/.cache/fedcrm/wheels
STAMP := $(VENV)/.installed-$(LOCK_HASH)

.PHONY: demo test e2e test-fast lint protos crds venv system-packages bench-secagg bench-operator privacy-table bench-dp bench-dp-utility bench-compression bench-gan-augmentation bench-startup bench-real-node images clean experiment-quick

demo: $(STAMP)  ## synthesise 10 enterprises' CRM data and train a federated model on it
	$(BIN)/fedcrm demo

test: $(STAMP) system-packages .venv-bench/.installed  ## the whole suite: layering contracts, stub freshness, unit, property, integration and real-node e2e tests
	$(BIN)/lint-imports
	$(BIN)/python tools/protos.py --check
	$(BIN)/python tools/crds.py --check
	e2e/build-control-plane >/dev/null  # Go-built kube-apiserver & co, cached under ~/.cache/fedcrm/k8s
	e2e/build-node >/dev/null  # kubelet, kube-proxy, CoreDNS, kube-router, Prometheus, cached under ~/.cache/fedcrm/node
	$(BIN)/python tools/build-images >/dev/null  # the three images the real-node e2e runs, cached by content hash
	$(BIN)/python -m pytest

e2e: $(STAMP) system-packages  ## the platform team's scenario on a real node: images, Helm charts, a Federation, NetworkPolicies, Prometheus (root)
	e2e/build-control-plane >/dev/null
	e2e/build-node >/dev/null
	$(BIN)/python tools/build-images >/dev/null
	$(BIN)/python -m pytest tests/test_real_node.py

test-fast: $(STAMP) system-packages .venv-bench/.installed  ## the inner-loop subset (no whole federations, no control plane), under 2 minutes
	$(BIN)/python -m pytest -m "not slow"

lint: $(STAMP)
	$(BIN)/lint-imports

protos: $(STAMP)  ## regenerate the gRPC stubs from protos/
	$(BIN)/python tools/protos.py

crds: $(STAMP)  ## regenerate crds/ from the spec models
	$(BIN)/python tools/crds.py

venv: $(STAMP)

system-packages:  ## Debian packages the tests run for real (PostgreSQL, Prometheus); skipped when present
	tools/install-system-packages

# Benchmarks. QUICK=1 makes any bench target a smoke-sized run (seconds to minutes; the scripts' --quick)
# whose results go to BENCH_OUT, by default bench/results/quick/ (git-ignored), never over the published ones.
QUICK ?=
BENCH_QUICK := $(if $(filter-out 0 no false,$(QUICK)),--quick)
BENCH_OUT ?= $(if $(BENCH_QUICK),bench/results/quick,bench/results)

# Flower lives in its own environment: it needs protobuf < 7 and cryptography >= 50,
# which our pinned gRPC stubs cannot share a process with. Its wheels are cached like .venv's.
BENCH_WHEELHOUSE := $(HOME)/.cache/fedcrm/wheels-bench
.venv-bench/.installed: bench/requirements-flower.txt tools/setup-venv
	@PYTHON=$(PYTHON) tools/setup-venv .venv-bench $(BENCH_WHEELHOUSE) bench/requirements-flower.txt
	@touch $@

bench-secagg: $(STAMP) .venv-bench/.installed  ## secure aggregation, ours against Flower's SecAgg+ (JSON in bench/results/)
	@mkdir -p $(BENCH_OUT)
	$(BIN)/python bench/secagg.py $(BENCH_QUICK) --json $(BENCH_OUT)/secagg.json

bench-operator: $(STAMP)  ## apply-to-children time and memory of the operator on a real control plane (JSON in bench/results/)
	e2e/build-control-plane >/dev/null
	$(BIN)/python bench/operator_scale.py $(BENCH_QUICK) --json $(BENCH_OUT)/operator.json

privacy-table: $(STAMP)  ## DP mode x epsilon: accuracy, F1, attack AUC (JSON, markdown, plot in bench/results/; ~1 h on 2 cores)
	nice -n 10 $(BIN)/python bench/privacy_table.py $(BENCH_QUICK) --results $(BENCH_OUT)

bench-dp-utility: $(STAMP)  ## DP on small skewed tenants: per-tenant DP-SGD vs pooled DP-SGD vs non-private (JSON, markdown in bench/results/; ~15 min)
	nice -n 10 $(BIN)/python bench/dp_utility.py $(BENCH_QUICK) --results $(BENCH_OUT)

bench-compression: $(STAMP)  ## secure aggregation unquantized vs 16-bit vs 8-bit updates, and 8-bit keeping a shared random 50/25/10 % of coordinates: accuracy, AUC, bytes up per client per round (JSON, markdown in bench/results/; ~7 min)
	nice -n 10 $(BIN)/python bench/update_compression.py $(BENCH_QUICK) --results $(BENCH_OUT)

bench-gan-augmentation: $(STAMP)  ## each participant's GAN augmentation vs none, with and without DP: accuracy, F1, AUC, membership-inference AUC (JSON, markdown in bench/results/; ~10 min)
	nice -n 10 $(BIN)/python bench/gan_augmentation.py $(BENCH_QUICK) --results $(BENCH_OUT)

bench-dp: $(STAMP)  ## cost of DP-SGD against non-private local training (samples/s, peak memory)
	$(BIN)/python bench/dp_cost.py $(or $(BENCH_QUICK),--rows 10000 --epochs 1 --repeats 2) --json $(BENCH_OUT)/dp_cost.json

bench-real-node: $(STAMP) system-packages  ## the walkthrough on a real node against `fedcrm run`: start-up, apply -> Running, the Kubernetes overhead (root)
	e2e/build-control-plane >/dev/null
	e2e/build-node >/dev/null
	@mkdir -p $(BENCH_OUT)
	$(BIN)/python bench/real_node.py $(BENCH_QUICK) --json $(BENCH_OUT)/real_node.json

bench-startup: $(STAMP)  ## time outside the rounds and launcher memory of `fedcrm run` (COMPARE=REF runs a git revision side by side)
	@mkdir -p $(BENCH_OUT)
	$(BIN)/python bench/startup.py $(BENCH_QUICK) $(if $(COMPARE),--compare $(COMPARE)) --json $(BENCH_OUT)/startup.json

bench-load: $(STAMP)  ## 100 participants, secure aggregation + client-level DP, 10 % dropping: round time, aggregator RSS, new protocol vs old
	@mkdir -p $(BENCH_OUT)
	$(BIN)/python bench/load.py $(BENCH_QUICK) --json $(BENCH_OUT)/load.json

# Experiments (docs/experiments.md): a grid of settings x seeds from experiments/$(EXP).yaml. The full files take
# hours (`fedcrm experiment --config experiments/$(EXP).yaml --out runs/experiments/$(EXP)`, resumable); this is
# their quick variant, through the same code path, into runs/experiments/ (git-ignored).
EXP ?= salesforce-10
experiment-quick: $(STAMP)  ## the quick variant of experiments/$(EXP).yaml: results.csv, results.md, plots (~3.5 min on 2 cores)
	nice -n 10 $(BIN)/fedcrm experiment --config experiments/$(EXP).yaml --quick --out runs/experiments/$(EXP)-quick

# Container images as OCI archives under ~/.cache/fedcrm/images, tagged by content hash; a rerun with nothing
# changed returns in about a second. IMAGE_TOOL=docker builds with a Docker engine instead (docs/images.md).
IMAGE_TOOL ?= buildah
images: $(STAMP) $(if $(filter buildah,$(IMAGE_TOOL)),system-packages)  ## operator, node and aggregator images as OCI archives, daemonless (refs in ~/.cache/fedcrm/images/current.json)
	$(BIN)/python tools/build-images --tool $(IMAGE_TOOL) >/dev/null

$(STAMP): pyproject.toml constraints.txt tools/requirements.py tools/setup-venv
	@mkdir -p $(VENV) && $(PYTHON) tools/requirements.py dev > $(VENV)/requirements.txt
	@PYTHON=$(PYTHON) tools/setup-venv $(VENV) $(WHEELHOUSE) $(VENV)/requirements.txt --constraints constraints.txt --editable \
	  --size-note "about 3 GB, most of it torch: a few minutes on a first machine"
	@rm -f $(VENV)/.installed-*
	@touch $@

clean:
	rm -rf $(VENV) .venv-bench .pytest_cache .hypothesis runs
