# The two commands a newcomer needs: `make demo` and `make test`. Both install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=
# The real Triton for tests/test_triton.py, in a venv of Debian's python3: PyTriton's
# Python-backend stub links the system libpython3.11 (tests/triton/server.py points it at its
# own interpreter's when another build runs it).
TRITON_PYTHON ?= /usr/bin/python3
TRITON_VENV ?= .venv-triton
TRITON_STAMP := $(TRITON_VENV)/.installed-stamp

.PHONY: install triton prometheus alertmanager lint typecheck test test-unit test-triton demo docs fuzz dashboard rules generate bench bench-quick bench-xl bench-report load dashboard-png clean

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) || { echo "python3 -m venv failed: on Debian run 'apt-get install python3-venv'"; exit 1; }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Falls back to the project's python when $(TRITON_PYTHON) has no venv module.
$(TRITON_STAMP): tests/triton/requirements.txt
	@$(TRITON_PYTHON) -m venv $(TRITON_VENV) 2>/dev/null || { rm -rf $(TRITON_VENV); \
	  echo "$(TRITON_PYTHON) -m venv failed; using $(PYTHON)"; $(PYTHON) -m venv $(TRITON_VENV); }
	$(TRITON_VENV)/bin/python -m pip install -q --upgrade pip
	$(TRITON_VENV)/bin/python -m pip install -q -r tests/triton/requirements.txt
	@touch $(TRITON_STAMP)

triton: $(TRITON_STAMP)

# Prometheus and promtool: from PATH, else fetched once from Debian's package into .cache/.
prometheus: $(STAMP)
	$(PY) -c "from exporter.lab.promserver import find_prometheus; b = find_prometheus(); print('prometheus', b.version, b.prometheus)"

alertmanager: $(STAMP)
	$(PY) -c "from exporter.lab.amserver import find_alertmanager; b = find_alertmanager(); print('alertmanager', b.version, b.alertmanager)"

lint: $(STAMP)
	$(VENV)/bin/ruff check exporter tests benchmarks docs/dashboard_png.py

typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: lint typecheck prometheus alertmanager triton
	TRITON_TEST_PYTHON=$(abspath $(TRITON_VENV))/bin/python $(PY) -m pytest $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

# The real-Triton test alone (about a minute): three tritonservers, Prometheus, the exporter.
test-triton: prometheus triton
	TRITON_TEST_PYTHON=$(abspath $(TRITON_VENV))/bin/python $(PY) -m pytest -m triton $(PYTEST_ARGS)

demo: prometheus alertmanager
	$(PY) -m exporter demo

clean:
	rm -rf $(VENV) $(TRITON_VENV) .cache .mypy_cache .ruff_cache .pytest_cache

docs: $(STAMP)
	$(PY) -m exporter.docs README.md

# Property tests with 10,000 examples each (make test runs them with a few hundred).
fuzz: $(STAMP)
	HYPOTHESIS_EXAMPLES=10000 $(PY) -m pytest -m fuzz --timeout=0 $(PYTEST_ARGS)

# Generated files: regenerate after changing the catalog or config.yaml (tests fail on drift).
dashboard: $(STAMP)
	$(PY) -m exporter dashboard --config.file config.yaml

# The README's picture of the dashboard's main panels (about 4 min on the demo's pieces).
dashboard-png: prometheus
	$(PY) docs/dashboard_png.py --out docs/img/dashboard.png

rules: $(STAMP)
	$(PY) -m exporter rules --out rules
	$(PY) -m exporter rules --out rules --format prometheusrule
	$(PY) -m exporter rules --out deploy/kubernetes --format prometheusrule-alerts
	P=$$($(PY) -c "from exporter.lab.promserver import find_prometheus; print(find_prometheus().promtool)"); \
	  $$P check rules rules/*.rules.yaml && cd rules/tests && $$P test rules *.yaml

# Every generated file at once.
generate: rules dashboard docs

# Benchmarks against a backfilled Prometheus (benchmarks/README.md): S, M, L in about 3 min,
# after the load run (50 scrapers for 30 s, then one scraper for 20 s with gzip and 20 s
# without, then one every 0.25 s for 30 s; ~2.5 min) whose figures docs/benchmarks.md also
# shows. The exporter runs without pyarrow, as the image ships it (no extras; pandas would
# import it).
bench: prometheus
	$(PY) benchmarks/load.py --json benchmarks/results/load.json
	$(PY) benchmarks/run.py --no-pyarrow --json benchmarks/results/latest.json --markdown docs/benchmarks.md --with-json benchmarks/results/xl.json

bench-quick: prometheus
	$(PY) benchmarks/run.py --no-pyarrow --quick

# XL (1000 servers, 2000 slices): about 20 min and ~7 GB of temporary disk.
bench-xl: prometheus
	$(PY) benchmarks/run.py --no-pyarrow --sizes XL --repeat 3 --json benchmarks/results/xl.json
	$(PY) benchmarks/run.py --render benchmarks/results/latest.json --with-json benchmarks/results/xl.json --markdown docs/benchmarks.md

# The report over 7 days of fleet L vs the notebook's pattern (docs/report-benchmark.md): about
# 40 min on 2 cores and 11 GB of temporary disk (--hours 24 for a day in about 8 min).
bench-report: prometheus
	$(PY) benchmarks/report_range.py --hours 168 --repeat 1 --json benchmarks/results/report.json --markdown docs/report-benchmark.md

# 50 concurrent scrapers for 30 s against ~100k derived series while cycles run, then one
# scraper (gzip, then plain) for 20 s each, then one every 0.25 s for 30 s (docs/hardening.md).
load: $(STAMP)
	$(PY) benchmarks/load.py --json benchmarks/results/load.json
