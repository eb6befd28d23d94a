# make run   - learn the shipped stream (no Kafka, Redis or Prometheus needed)
# make test  - lint + the whole test suite, starting the services it needs
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: all setup setup-test run test lint format bench clean
all: test

setup:
	./scripts/setup.sh

setup-test:
	WITH_SERVICES=1 ./scripts/setup.sh

run: setup
	$(BIN)/stream-cl run

lint: setup-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

format: setup-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
