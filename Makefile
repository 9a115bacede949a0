# `make demo` and `make test` are the whole set-up on a fresh machine: both (re)install the
# project into .venv first when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install benchmark clean cluster-up cluster-down

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/certrepro demo demo/digits

test: $(STAMP)
	$(PY) -m pytest -q

benchmark: $(STAMP)
	$(PY) benchmarks/step_cost.py

clean:
	rm -rf $(VENV) .certrepro .pytest_cache

# The local cluster (docker-compose.yml; README "Cluster"). CPU=1 on machines without NVIDIA
# GPUs, WORKERS=N Ray worker nodes. `cluster-down` keeps the volumes (job store, MLflow,
# checkpoints); `docker compose down -v` deletes them.
COMPOSE ?= docker compose
WORKERS ?= 1
COMPOSE_FILES := -f docker-compose.yml $(if $(CPU),-f docker-compose.cpu.yml)

cluster-up: .env
	GIT_COMMIT=$$(git rev-parse HEAD 2>/dev/null || echo unknown) \
	  $(COMPOSE) $(COMPOSE_FILES) up -d --build --scale ray-worker=$(WORKERS)
	$(COMPOSE) $(COMPOSE_FILES) ps

cluster-down:
	$(COMPOSE) $(COMPOSE_FILES) down

# First run: .env from .env.example with a random PostgreSQL password, API key and Ray token.
.env:
	sed -e "s/^POSTGRES_PASSWORD=change-me$$/POSTGRES_PASSWORD=$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(18))')/" \
	    -e "s/^CERTREPRO_API_KEY=change-me$$/CERTREPRO_API_KEY=$$($(PYTHON) -c 'import secrets; print(secrets.token_urlsafe(24))')/" \
	    -e "s/^RAY_AUTH_TOKEN=change-me$$/RAY_AUTH_TOKEN=$$($(PYTHON) -c 'import secrets; print(secrets.token_hex(32))')/" \
	    .env.example > .env
	@echo "wrote .env (PostgreSQL password, API key and Ray token generated)"
