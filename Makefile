# backupd: the two commands a user needs are `make run` and `make test`.
CARGO ?= cargo

.PHONY: run test lint build release bench bench-quick soak fuzz clean

## Build (release) and start the server with its embedded defaults.
run:
	$(CARGO) run --release --bin backupd

## Format check, clippy, and every test.
test: lint
	$(CARGO) test --all-targets

## Formatting and lints only.
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

build:
	$(CARGO) build

release:
	$(CARGO) build --release

## Benchmarks of issue 5 (docs/PERFORMANCE.md): micro benchmarks, then the
## machine's limits and the load scenarios against the release binary.
## Figures: stdout, target/bench/results.json and target/bench/micro.json.
## Extra load flags: make bench BENCH_ARGS="--scenario small --rounds 5".
bench:
	$(CARGO) build --release --bin backupd
	$(CARGO) bench --bench micro
	$(CARGO) bench --bench load -- $(BENCH_ARGS)

## The same, everything small (about a minute once built).
bench-quick:
	$(CARGO) build --release --bin backupd
	$(CARGO) bench --bench micro -- --quick
	$(CARGO) bench --bench load -- --quick $(BENCH_ARGS)

clean:
	$(CARGO) clean
