# Every pip call pins torch: unpinned, pip picks a CUDA build and dozens of packages.
# GPU users override, e.g.  make install TORCH="torch==2.14.1 torchvision==0.29.1" PIP_EXTRA="--index-url ..."
TORCH ?= torch==2.14.1 torchvision==0.29.1
PIP_EXTRA ?=
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vitpipe-installed
PYTEST_ARGS ?=

.PHONY: install test demo bench lint clean

install: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing torch, accelerate, DeepSpeed, Ray and the other dependencies into $(VENV) (a few minutes; pip reports each package)"
	$(BIN)/pip install --disable-pip-version-check --progress-bar on $(PIP_EXTRA) $(TORCH) -e ".[dev]"
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Fashion-MNIST ships in a Debian package; where apt cannot install it the demo uses scikit-learn's digits.
FASHION := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

demo: install
	@test -f $(FASHION) || (command -v apt-get >/dev/null && (apt-get install -y -q dataset-fashion-mnist \
		|| (apt-get update -q && apt-get install -y -q dataset-fashion-mnist))) >/dev/null 2>&1 \
		|| echo "dataset-fashion-mnist not installable here: the demo falls back to scikit-learn's digits"
	$(BIN)/vitpipe demo --out runs/demo

bench: install
	$(BIN)/python bench/model.py
	$(BIN)/python bench/data.py
	$(BIN)/python bench/train.py
	$(BIN)/python bench/resume.py

lint: install
	$(BIN)/ruff check .

clean:
	rm -rf runs build *.egg-info
