# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
# torch is pinned here (a local CPU wheel on our machines; other specs may pull a multi-GB CUDA build).
TORCH  ?= torch==2.13.0
PG_URL ?= postgresql+psycopg://postgres@127.0.0.1:5432/postgres

.PHONY: install demo test lint bench bench-quick bench-paired bench-s3 gpu-stall torture crashcheck faultcheck racecheck clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]" "$(TORCH)"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python examples/train.py

# Runs every test on SQLite, and on PostgreSQL too when a server answers at 127.0.0.1:5432
# (or CKPTDB_TEST_PG_URL names one).
test: install
	@if [ -z "$$CKPTDB_TEST_PG_URL" ] && $(BIN)/python -c "import psycopg; psycopg.connect('host=127.0.0.1 port=5432 user=postgres dbname=postgres', connect_timeout=3).close()" 2>/dev/null; then \
		echo "PostgreSQL answers at 127.0.0.1:5432: running the PostgreSQL tests too"; \
		export CKPTDB_TEST_PG_URL="$(PG_URL)"; \
	else \
		[ -n "$$CKPTDB_TEST_PG_URL" ] || echo "no PostgreSQL at 127.0.0.1:5432: PostgreSQL tests are skipped"; \
	fi; \
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Save/load throughput against the disk's limits and the peers, one table per size, and the catalog
# targets (docs/benchmarks.md, docs/bench_save_load.png; issue 14): 0.25, 1 and 4 GiB states and
# 50 000 small tensors, under 15 minutes here. BENCH_ARGS="--gib 1 --reps 5" to choose.
# bench-quick: 0.25 GiB and 10 000 small tensors, no docs written, under 3 minutes.
# gpu-stall: async saves from CUDA tensors (exits with a message where there is no GPU).
BENCH_ARGS ?=
bench: install
	$(BIN)/python benchmarks/save_load_bench.py --pg-url "$(PG_URL)" $(BENCH_ARGS)
	$(BIN)/python benchmarks/retention_bench.py --pg-url "$(PG_URL)" --write-docs docs/benchmarks.md
	$(BIN)/python benchmarks/ui_bench.py --pg-url "$(PG_URL)"

bench-quick: install
	$(BIN)/python benchmarks/save_load_bench.py --quick --no-doc --pg-url "$(PG_URL)"

# bench-paired: ckptdb's file writer and verified load against raw writes / reads, 9 alternating reps
# with paired ratios (the disk's speed drifts; see docs/benchmarks.md); about 2 minutes at 1 GiB.
# BENCH_ARGS="--only-small --small 50000 --reps 5": saves, async stall and loads of 50 000 small
# tensors against torch.save / torch.load, with and without the C unpickler (about 2 minutes).
bench-paired: install
	$(BIN)/python benchmarks/paired.py $(BENCH_ARGS)

# ckptdb's save/load on S3 (SeaweedFS on loopback) against raw boto3 multipart / ranged GETs and the
# peers (DCP FsspecWriter and torch.save over s3fs), alternating reps, ratios (docs/benchmarks.md,
# docs/bench_s3.png; issue 12); about 3 minutes here. The peers run in a second venv: s3fs pulls
# aiobotocore, which pins an older botocore than the dev environment's.
S3FS_VENV ?= .venv-s3fs
$(S3FS_VENV)/.installed-stamp:
	$(PYTHON) -m venv $(S3FS_VENV)
	$(S3FS_VENV)/bin/pip install -q "$(TORCH)" s3fs numpy
	touch $@

bench-s3: install $(S3FS_VENV)/.installed-stamp
	$(BIN)/python benchmarks/s3_save_bench.py --peers-python $(S3FS_VENV)/bin/python \
		--write-docs docs/benchmarks.md --plot docs/bench_s3.png $(BENCH_ARGS)

gpu-stall: install
	$(BIN)/python benchmarks/gpu_stall.py --write-docs docs/benchmarks.md

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy ckptdb

# Retention and catalog scale (a few minutes; PostgreSQL part skipped when no server answers).
# The long crash torture (200 random SIGKILLs per backend); `make test` runs a 12-kill version.
torture: install
	rm -rf /tmp/ckptdb-torture && $(BIN)/python scripts/torture.py --kills 200 --dir /tmp/ckptdb-torture/sqlite/ck
	$(BIN)/python scripts/torture.py --kills 200 --dir /tmp/ckptdb-torture/pg/ck --fresh-db --url "$(PG_URL)"

# The crash torture on s3:// runs (SeaweedFS started by the script): 100 kills per catalog backend.
torture-s3: install
	rm -rf /tmp/ckptdb-torture-s3 && $(BIN)/python scripts/torture.py --kills 100 --max-delay 3 --s3 seaweedfs --dir /tmp/ckptdb-torture-s3/sqlite/ck
	$(BIN)/python scripts/torture.py --kills 100 --max-delay 3 --s3 seaweedfs --dir /tmp/ckptdb-torture-s3/pg/ck --fresh-db --url "$(PG_URL)"

# Failed syscalls below Python (docs/reliability.md): every protocol, the Nth call of
# every file-system syscall it makes failed with EIO / ENOSPC / EROFS, for every N (1737 faults, about 20 min here).
# `make test` runs a subset (~20 s; tests/checkers/test_faultcheck.py). Needs gcc (LD_PRELOAD shim).
faultcheck: install
	$(BIN)/python scripts/faultcheck/faultcheck.py $(FAULTCHECK_ARGS)

# Every (hook point, second operation) interleaving of two processes, on SQLite and PostgreSQL
# (docs/reliability.md; ~30 min per backend on 2 shared cores). `make test` runs 15 pairs.
racecheck: install
	$(BIN)/python scripts/racecheck.py --pg-url "$(PG_URL)" --out /tmp/ckptdb-racecheck.json

# Every crash state (power loss) of every protocol, under the ext4 and strict models
# (ckptdb/testing/crashcheck.py, docs/reliability.md; needs strace; about 20 minutes
# here). `make test` runs a fast subset (tests/checkers/test_crashcheck.py).
crashcheck: install
	PYTHONDONTWRITEBYTECODE=1 $(BIN)/python -u -m ckptdb.testing.crashcheck --workdir /tmp/ckptdb-crashcheck $(CRASHCHECK_ARGS)

clean:
	rm -rf $(VENV) demo-out .pytest_cache
