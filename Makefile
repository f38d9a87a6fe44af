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

clean:
	$(CARGO) clean
