# phizer: `make run` starts the whole stack, `make test` runs every test.
# Both install whatever this machine lacks first (Debian packages, .venv, pillow-simd with AVX2).

PYTHON      ?= python3
VENV        := .venv
VPY         := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
THUMBOR_VENV  := bench/.venv-thumbor
THUMBOR_STAMP := $(THUMBOR_VENV)/.installed
# Debian packages the stack and its tests need; installed only when absent.
# (binutils: objdump, with which a test checks pillow-simd's AVX2 code; wrk: the bench and its smoke test.)
APT_PACKAGES := nginx-light memcached debootstrap gcc binutils python3-dev python3-venv wrk \
                zlib1g-dev libjpeg62-turbo-dev libwebp-dev liblcms2-dev libtiff-dev libopenjp2-7-dev chromium
# Debian packages only the bench's peers need (ipx runs on Node): installed when the `npm` command is missing (a
# machine may have Node.js from elsewhere, e.g. NodeSource's nodejs, which carries its own npm and conflicts with
# Debian's npm package).
BENCH_APT_PACKAGES := nodejs npm
IPX_DIR       := bench/ipx
IPX_STAMP     := $(IPX_DIR)/node_modules/.installed
PILLOW_SIMD := $(shell grep -i '^pillow-simd==' requirements.txt)
# Plain Pillow must never replace pillow-simd: keep the machine's own constraints and add ours.
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt $(wildcard /etc/xdg/pip/constraints.txt)
AVX2 := $(shell grep -qw avx2 /proc/cpuinfo 2>/dev/null && echo 1)

.PHONY: run test bench soak deploy lint system-deps bench-deps install clean

run: install
	$(VENV)/bin/phizer run

test: install
	$(VPY) -m ruff check service tests bench
	$(VPY) -m pytest

bench: install $(THUMBOR_STAMP) $(IPX_STAMP)
	$(VPY) -m bench.run

# Ten minutes of mixed traffic (hits, misses, 404s, hostile files, bursts beyond the render budget) through the real
# stack; writes bench/results/soak.{md,json,png}. SOAK_ARGS passes options, e.g. SOAK_ARGS="--minutes 1".
soak: install $(THUMBOR_STAMP)
	$(VPY) -m bench.soak $(SOAK_ARGS)

# The bench's peer (thumbor) and its chart's matplotlib need plain Pillow: their own venv, installed
# with the machine's constraints only (ours forbid Pillow, rightly, for .venv).
$(THUMBOR_STAMP): bench/requirements-thumbor.txt
	$(PYTHON) -m venv $(THUMBOR_VENV)
	PIP_CONSTRAINT="$(wildcard /etc/xdg/pip/constraints.txt)" $(THUMBOR_VENV)/bin/pip install -q -r bench/requirements-thumbor.txt
	touch $@

bench-deps:
	@command -v npm >/dev/null 2>&1 || $(MAKE) --no-print-directory system-deps APT_PACKAGES="$(BENCH_APT_PACKAGES)"

# The bench's libvips peer: ipx with sharp (libvips inside sharp's prebuilt npm packages), as package-lock.json pins.
$(IPX_STAMP): $(IPX_DIR)/package.json $(IPX_DIR)/package-lock.json | bench-deps
	cd $(IPX_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

# `make deploy INVENTORY=ansible/inventories/<yours>` (see ansible/inventories/example); ANSIBLE_ARGS passes
# more options, e.g. ANSIBLE_ARGS="--check --diff" or "-e phizer_serial=1". PIP_CONSTRAINT names files of this
# machine: keep it away from hosts reached by a local or chroot connection.
deploy: install
	@test -n "$(INVENTORY)" || { echo "usage: make deploy INVENTORY=ansible/inventories/<yours>" >&2; exit 2; }
	env -u PIP_CONSTRAINT ANSIBLE_CONFIG=ansible/ansible.cfg $(VENV)/bin/ansible-playbook -i $(INVENTORY) ansible/site.yml $(ANSIBLE_ARGS)

lint: install
	$(VPY) -m ruff check service tests bench

install: system-deps $(STAMP)

# apt-get only when a package is missing, so an installed machine needs no root and no network.
system-deps:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    echo "installing Debian packages: $$missing"; \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	    $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

$(STAMP): requirements.txt requirements-dev.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip wheel setuptools
	# pillow-simd compiles from source; -mavx2 doubles its resampling speed where the CPU has AVX2.
	CC="cc $(if $(AVX2),-mavx2)" $(VPY) -m pip install -q --no-binary pillow-simd "$(PILLOW_SIMD)"
	$(VPY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	# The `phizer` command (pyproject.toml's [project.scripts]), running this checkout's code; dependencies above.
	$(VPY) -m pip install -q --no-deps --no-build-isolation -e .
	$(VPY) -c "import PIL, PIL.features; assert '.post' in PIL.__version__, 'not pillow-simd: ' + PIL.__version__; \
	    assert PIL.features.check('jpg') and PIL.features.check('webp') and PIL.features.check('littlecms2')"
	touch $@

clean:
	rm -rf $(VENV) $(THUMBOR_VENV) $(IPX_DIR)/node_modules state
