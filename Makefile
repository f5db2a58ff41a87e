# The two set-up commands (see README): `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin

.PHONY: demo test lint bench opencv-doc clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[demo,dev,serve,ray]'
	touch $@

demo: $(VENV)/.installed
	$(BIN)/mmretrieve demo

test: $(VENV)/.installed
	$(BIN)/ruff check mmretrieve tests demos
	@# pytest on two xdist workers (a test file each at a time, one thread each: tests/conftest.py), about
	@# 1.7x faster than one process on 2 cores. Beside it, the Ray engine's tests (local mode and a 2-node
	@# cluster simulated on this machine, loopback only), which mostly wait on Ray's processes starting
	@# (about 1 min of CPU in 3 min; the main run is niced so their bursts get a core): their output follows.
	@set -e; log=$$(mktemp); \
	RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_USAGE_STATS_ENABLED=0 \
		$(BIN)/python -m pytest -q -m ray -p no:cacheprovider >$$log 2>&1 & ray=$$!; \
	main=0; nice -n 10 $(BIN)/python -m pytest -q -n 2 --dist loadfile --durations=20 || main=$$?; \
	rayrc=0; wait $$ray || rayrc=$$?; \
	echo "--- the Ray engine's tests (pytest -m ray), run beside the main run:"; cat $$log; rm -f $$log; \
	test $$main = 0 && test $$rayrc = 0
	@# the documentation site (docs/, mkdocs.yml): a broken link or anchor, or a page left out of the nav, fails.
	@# No -q: mkdocs' -q hides the warnings that --strict turns into a failure.
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict
	@# where `auto` picks bf16 (CPUs with AVX512-BF16 / AMX), the fp32 path runs too
	if grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then \
		MMRETRIEVE_PRECISION=fp32 $(BIN)/python -m pytest -q -m precision -p no:cacheprovider -n 2 --dist loadfile; fi

lint: $(VENV)/.installed
	$(BIN)/ruff check mmretrieve tests demos

bench: $(VENV)/.installed
	$(BIN)/mmretrieve bench ingest
	$(BIN)/mmretrieve bench search

# Debian's opencv-doc ships ~90 sample photos used by the offline benchmarks (unpacked, not installed)
opencv-doc: .cache/opencv-doc/usr/share/doc/opencv-doc/examples/data/fruits.jpg
.cache/opencv-doc/usr/share/doc/opencv-doc/examples/data/fruits.jpg:
	mkdir -p .cache/opencv-doc
	cd .cache/opencv-doc && apt-get download opencv-doc && dpkg -x opencv-doc_*.deb . && rm -f opencv-doc_*.deb

clean:
	rm -rf $(VENV) demo-output .pytest_cache .ruff_cache
