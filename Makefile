# backupd: the two commands a user needs are `make run` and `make test`.
CARGO ?= cargo

.PHONY: run test test-s3 garage release-s3 lint fuzz-check build release size install install-files uninstall bench bench-quick soak fuzz fuzz-corpus clean

## Build (release) and start the server with its embedded defaults.
run:
	$(CARGO) run --release --bin backupd

## Format check, clippy, the fuzz targets compile, and every test.
test: lint fuzz-check
	$(CARGO) test --all-targets

## The S3 tier (issue 13, docs/SCALING.md) against a real single-node Garage
## that each test starts in a temp dir: lints with the `s3` feature, its unit
## tests, then tests/s3/ (every test, the 1 GiB multipart one included).
## Builds Garage first when it is missing (`make garage`). Without Garage the
## tests fail, they do not skip.
test-s3: garage
	$(CARGO) clippy --features s3 --all-targets -- -D warnings
	$(CARGO) test --features s3 --lib s3
	GARAGE_BIN=$(GARAGE_BIN) $(CARGO) test --features s3 --test s3 -- --include-ignored

## Garage (https://garagehq.deuxfleurs.fr), the S3 store of the tests and the
## bench: built once with `cargo install` (about 11 minutes on 2 cores) into
## a cache folder outside the repository, reused after that.
GARAGE_VERSION ?= 2.5.0
GARAGE_ROOT ?= $(HOME)/.cache/backupd/garage
GARAGE_BIN = $(GARAGE_ROOT)/bin/garage
garage:
	@if [ -x "$(GARAGE_BIN)" ]; then \
	  echo "garage: using $(GARAGE_BIN) ($$($(GARAGE_BIN) --version 2>/dev/null | head -n 1))"; \
	else \
	  echo "garage: building garage $(GARAGE_VERSION) into $(GARAGE_ROOT) (about 11 minutes)"; \
	  $(CARGO) install --locked garage --version $(GARAGE_VERSION) --root $(GARAGE_ROOT); \
	fi

## Formatting and lints only.
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

## The fuzz targets (fuzz/, a workspace of its own that `cargo test` never
## sees) still compile. A type check on stable Rust, no cargo-fuzz, no nightly
## flags. Nothing is linked, so libFuzzer's C++ (which libfuzzer-sys's build
## script would compile, about a third of a cold check) is skipped by pointing
## CUSTOM_LIBFUZZER_PATH at a library that is never used. Its own target
## directory (fuzz/target/debug): about a minute cold, a second or two after.
fuzz-check:
	cd fuzz && CUSTOM_LIBFUZZER_PATH=/nonexistent/libfuzzer-not-linked-by-check.a $(CARGO) check --bins

## Long hostile-client and crash-consistency variants (the #[ignore]d tests), release build.
soak:
	$(CARGO) test --release --test hostile --test faults -- --ignored --test-threads=1

build:
	$(CARGO) build

release:
	$(CARGO) build --release

## The stripped release binary against its budget on the target boxes
## (docs/PERFORMANCE.md, "Binary size"). Not part of `make test`. Fails when
## the binary is over the budget.
SIZE_BUDGET ?= 2097152
size: release
	@bytes=$$(wc -c < target/release/backupd); \
	echo "target/release/backupd: $$bytes bytes stripped, budget $(SIZE_BUDGET) bytes (2 MiB)"; \
	if [ $$bytes -gt $(SIZE_BUDGET) ]; then echo "over the budget by $$((bytes - $(SIZE_BUDGET))) bytes"; exit 1; fi

## Install (docs/OPERATIONS.md, "Install"): the release binaries, the systemd
## units, the sysusers.d entry, the logrotate example and the docs, under
## $(DESTDIR)$(PREFIX). The units name $(BINDIR)/backupd and $(DOCDIR).
## /etc/default/backupd is installed only when it does not exist yet.
## `install-files` installs what $(BUILD_DIR) holds without building (e.g.
## `make release` as yourself, then `sudo make install-files`).
PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
UNITDIR ?= $(PREFIX)/lib/systemd/system
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
DOCDIR ?= $(PREFIX)/share/doc/backupd
SYSCONFDIR ?= /etc
BUILD_DIR ?= target/release
INSTALL ?= install
UNITS = backupd.service backupd-verify.service backupd-verify.timer

install: release
	$(MAKE) install-files

install-files:
	$(INSTALL) -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(UNITDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(DOCDIR) \
	  $(DESTDIR)$(SYSCONFDIR)/logrotate.d $(DESTDIR)$(SYSCONFDIR)/default
	$(INSTALL) -m 0755 $(BUILD_DIR)/backupd $(BUILD_DIR)/backup-client $(DESTDIR)$(BINDIR)/
	for u in $(UNITS); do \
	  sed -e 's|/usr/local/bin/|$(BINDIR)/|g' -e 's|/usr/local/share/doc/backupd|$(DOCDIR)|g' \
	    -e 's|/etc/default/backupd|$(SYSCONFDIR)/default/backupd|g' dist/$$u > $(DESTDIR)$(UNITDIR)/$$u.new && \
	  chmod 0644 $(DESTDIR)$(UNITDIR)/$$u.new && mv $(DESTDIR)$(UNITDIR)/$$u.new $(DESTDIR)$(UNITDIR)/$$u || exit 1; \
	done
	$(INSTALL) -m 0644 dist/backupd.sysusers $(DESTDIR)$(SYSUSERSDIR)/backupd.conf
	$(INSTALL) -m 0644 dist/backupd.logrotate $(DESTDIR)$(SYSCONFDIR)/logrotate.d/backupd
	$(INSTALL) -m 0644 README.md docs/OPERATIONS.md dist/grafana-dashboard.json dist/backupd.env $(DESTDIR)$(DOCDIR)/
	test -e $(DESTDIR)$(SYSCONFDIR)/default/backupd || \
	  $(INSTALL) -m 0644 dist/backupd.env $(DESTDIR)$(SYSCONFDIR)/default/backupd
	@echo "installed. Next (as root): systemd-sysusers; systemctl daemon-reload;"
	@echo "  systemctl enable --now backupd.service backupd-verify.timer"

## Remove what install-files put in place (not /etc/default/backupd, not the data).
uninstall:
	rm -f $(DESTDIR)$(BINDIR)/backupd $(DESTDIR)$(BINDIR)/backup-client
	for u in $(UNITS); do rm -f $(DESTDIR)$(UNITDIR)/$$u; done
	rm -f $(DESTDIR)$(SYSUSERSDIR)/backupd.conf $(DESTDIR)$(SYSCONFDIR)/logrotate.d/backupd
	rm -rf $(DESTDIR)$(DOCDIR)

## Benchmarks of issues 5 and 14 (docs/PERFORMANCE.md): micro benchmarks,
## then the machine's limits and the load scenarios against the release
## binary, then the same scenarios with the server confined to one core and
## 256 MB (--confined), reported beside. Figures: stdout,
## target/bench/results.json, target/bench/micro.json, and drawn in
## target/bench/report.svg.
## Extra load flags: make bench BENCH_ARGS="--scenario small --rounds 5".
BENCH_SETS ?= --confined
bench: release-s3
	$(CARGO) build --release --bin backupd
	$(CARGO) bench --bench micro
	GARAGE_BIN=$(GARAGE_BIN) $(CARGO) bench --bench load -- $(BENCH_SETS) $(BENCH_ARGS)

## Scenario 5 (replica mode) runs target/release/backupd-s3, the release
## binary with the `s3` feature, against a Garage of its own (`make garage`;
## without one the scenario says so and is skipped).
release-s3:
	$(CARGO) build --release --features s3 --bin backupd
	cp target/release/backupd target/release/backupd-s3

## The same, everything small (a few minutes once built).
bench-quick: release-s3
	$(CARGO) build --release --bin backupd
	$(CARGO) bench --bench micro -- --quick
	GARAGE_BIN=$(GARAGE_BIN) $(CARGO) bench --bench load -- --quick $(BENCH_SETS) $(BENCH_ARGS)

## Fuzzing (issue 4, fuzz/): each cargo-fuzz target for FUZZ_SECONDS seconds,
## from the committed seeds (fuzz/corpus/; new inputs go to fuzz/target/corpus/).
## Installs cargo-fuzz if missing. Only stable Rust is installed: RUSTC_BOOTSTRAP=1
## lets it take cargo-fuzz's -Z flags. AddressSanitizer, or no sanitizer if that
## build fails. Debug assertions (overflow checks) on. A crash fails the rule and
## leaves its input in fuzz/artifacts/<target>/.
FUZZ_SECONDS ?= 30
FUZZ_SANITIZER ?= address
FUZZ_TARGETS ?= frame_decoder payload_parsers packet_sequence stream_decrypt session path_normalize
fuzz:
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz
	@set -e; san=$(FUZZ_SANITIZER); \
	if ! RUSTC_BOOTSTRAP=1 $(CARGO) fuzz build -a --sanitizer $$san; then \
	  echo "fuzz: the $$san sanitizer build failed; building without a sanitizer"; san=none; \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz build -a --sanitizer none; \
	fi; \
	for t in $(FUZZ_TARGETS); do \
	  mkdir -p fuzz/target/corpus/$$t; \
	  echo "== fuzz $$t for $(FUZZ_SECONDS) s (sanitizer: $$san)"; \
	  RUSTC_BOOTSTRAP=1 $(CARGO) fuzz run -a --sanitizer $$san $$t fuzz/target/corpus/$$t fuzz/corpus/$$t \
	    -- -max_total_time=$(FUZZ_SECONDS) -max_len=8192 -print_final_stats=1; \
	done

## Rewrite the committed seed corpus (fuzz/corpus/<target>/) from the
## generators in tests/fuzz_regressions.rs, after a harness input format or
## the path rules changed. Review the change with `git status fuzz/corpus`.
fuzz-corpus:
	$(CARGO) test --test fuzz_regressions -- --ignored --exact write_seed_corpus

clean:
	$(CARGO) clean
