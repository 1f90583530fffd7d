# The README's two commands are `make demo` and `make test`; both set up .venv first.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || command -v python3 2>/dev/null)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo serve test test-django52 lint typecheck pytest docs bench chaos clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements-dev.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 12) else "Python >= 3.12 is needed (pyenv install 3.12, see .python-version)")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

demo: install
	$(PY) example_project/manage.py demo

serve: install
	$(PY) example_project/manage.py serve

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: install
	$(VENV)/bin/mypy django_absurd_agents

pytest: install
	$(PY) -m pytest -q

test: lint typecheck pytest test-django52

# Django 5.2 LTS leg: a second venv with the same pins but Django 5.2.
test-django52: install
	@test -x .venv-django52/bin/python || ($(PYTHON) -m venv .venv-django52 && \
		.venv-django52/bin/python -m pip install --quiet --upgrade pip && \
		.venv-django52/bin/python -m pip install --quiet -r requirements-dev.txt "django>=5.2,<5.3" && \
		.venv-django52/bin/python -m pip install --quiet --no-deps -e .)
	.venv-django52/bin/python -m pytest -q -m "not slow"

docs: install
	$(VENV)/bin/mkdocs build --strict

bench: install
	$(PY) bench/run_all.py

chaos: install
	$(PY) bench/chaos.py

clean:
	rm -rf $(VENV) .venv-django52 site build *.egg-info
