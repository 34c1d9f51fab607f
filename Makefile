# The two set-up commands of the README: `make demo` and `make test`.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
DEMO_ARGS = --dataset digits --method dc --ipc 1 --iterations 100 --eval-models 5 --out runs/demo --seed 0

.PHONY: install install-test data demo test

# torch first, pinned, so that nothing later pulls a different build of it, with the build's own needs; the install
# compiles the C++ extensions against that torch, so pip must not build in an isolated environment of its own.
install:
	$(PIP) install --quiet torch==2.13.0 "setuptools>=68" ninja
	$(PIP) install --quiet --no-build-isolation -c constraints.txt -e ".[plot]"

# The test extras add pytest, hypothesis, triton (its kernels are interpreted on CPU) and ruff.
install-test: install
	$(PIP) install --quiet --no-build-isolation -c constraints.txt -e ".[test,plot]"

# Real data for the tests (Fashion-MNIST from Debian); skipped where apt-get is not usable.
data:
	@if [ -d /usr/share/datasets/fashion-mnist ]; then echo "fashion-mnist: present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null; \
	else echo "fashion-mnist: not installed (needs root and apt-get); its tests will be skipped"; fi

demo: install
	rm -rf runs/demo
	$(PYTHON) -m fastdd.cli distill $(DEMO_ARGS)

test: install-test data
	$(PYTHON) -m pytest tests
