# kansas: `make test` and `make run` do their own set-up on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The checkout on sys.path lets twistd find twisted/plugins/kansas_plugin.py.
export PYTHONPATH := $(CURDIR)

.PHONY: test lint typecheck suite run bench chaos fuzz fuzz-corpus format clean system-deps zulip-e2e

system-deps:
	@scripts/system-deps.sh

$(BIN)/.installed: setup.cfg setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

test: lint typecheck suite

lint: $(BIN)/.installed
	$(BIN)/ruff check src tests twisted bench scripts
	$(BIN)/ruff format --check src tests twisted bench scripts

typecheck: $(BIN)/.installed
	$(BIN)/mypy

suite: $(BIN)/.installed
	@scripts/system-deps.sh nginx prometheus nft=nftables
	$(BIN)/pytest -q $(PYTEST_ARGS)

# The end-to-end test against a live Zulip with kansas.zulip enabled (stage 2 of
# docs/deploy.md): KANSAS_LIVE_ZULIP names the file describing it (tests/test_zulip_live.py).
zulip-e2e: $(BIN)/.installed
	@test -n "$$KANSAS_LIVE_ZULIP" || { echo "make zulip-e2e: set KANSAS_LIVE_ZULIP=/path/to/live.json (see tests/test_zulip_live.py)" >&2; exit 2; }
	$(BIN)/pytest -q -s -rs tests/test_zulip_live.py

run: $(BIN)/.installed system-deps
	$(BIN)/python -m kansas.demo.stack

bench: $(BIN)/.installed
	@scripts/system-deps.sh wrk nginx
	$(BIN)/pip install --quiet -e '.[test,bench]'
	$(BIN)/python bench/first_figure.py
	$(BIN)/python bench/against_nginx.py --write
	$(BIN)/python bench/workers.py --write
	$(BIN)/python bench/longpoll_memory.py --write

chaos: $(BIN)/.installed system-deps
	$(BIN)/python scripts/chaos.py $(CHAOS_ARGS)

# make fuzz: the hypothesis properties at length, then the differential fuzzer (atheris:
# kansas's request parser against h11 and llhttp) for FUZZ_SECONDS; new inputs go to
# .fuzz/corpus (git-ignored), findings to .fuzz/findings (then the target fails).
# make fuzz-corpus adds to tests/corpus/parser the inputs of .fuzz/corpus that reach new
# coverage (libFuzzer's merge; the inputs already there stay).
FUZZ_SECONDS ?= 300
FUZZ_OPTIONS := -artifact_prefix=.fuzz/ -dict=scripts/fuzz_parser.dict -max_len=2048 -timeout=10 -print_final_stats=1
fuzz: $(BIN)/.installed
	$(BIN)/pip install --quiet -e '.[test,fuzz]'
	KANSAS_FUZZ_EXAMPLES=$${KANSAS_FUZZ_EXAMPLES:-20000} $(BIN)/pytest -q tests/test_fuzz.py --timeout 0
	rm -rf .fuzz/findings && mkdir -p .fuzz/corpus
	nice $(BIN)/python scripts/fuzz_parser.py .fuzz/corpus tests/corpus/parser \
		-max_total_time=$(FUZZ_SECONDS) $(FUZZ_OPTIONS)
	@if [ -d .fuzz/findings ]; then cat .fuzz/findings/*.txt; exit 1; fi

fuzz-corpus: $(BIN)/.installed
	mkdir -p .fuzz/corpus
	nice $(BIN)/python scripts/fuzz_parser.py -merge=1 tests/corpus/parser .fuzz/corpus \
		$(FUZZ_OPTIONS)

format: $(BIN)/.installed
	$(BIN)/ruff format src tests twisted bench scripts
	$(BIN)/ruff check --fix src tests twisted bench scripts

clean:
	rm -rf $(VENV) .run build *.egg-info src/*.egg-info
