# kmodd — one entry point for humans and CI.  `make test` and `make demo` install
# everything they need on a fresh Debian 12 machine (run as root).

PYTHON      ?= /usr/bin/python3
VENV        := .venv
VPY         := $(VENV)/bin/python
# apt packages: kmod is the oracle (modprobe/depmod) and libkmod; no C compiler for Python
# (every dependency is a wheel: tests/test_packaging.py); qemu runs the real kernel;
# udev/systemd give the real udevd and journald the runtime tests talk to; virtme-ng
# reads the kernel release of a vmlinuz with file(1); initramfs-tools (mkinitramfs,
# lsinitramfs, unmkinitramfs), zstd, xz-utils (mkinitramfs -c xz: without it Debian 13's
# falls back to gzip) and cpio build and read real initramfs images for the
# early-boot hook's tests (~2.5 s per image); clang (bpf target) and libbpf-dev
# (bpf_helpers.h) build the kernel layer's BPF object, libbpf1 loads it;
# systemd-journal-remote (~100 KB) is the fleet collector pair (journal-remote/-upload)
# that tests/cli/test_fleet.py runs on loopback (~6 s).  debootstrap builds the chroot of
# this machine's release tests/contrib/test_ansible.py runs the Ansible role against
# (cached, ~300 MB) and, with e2fsprogs (mkfs.ext4 -d, debugfs: no loop device), the
# real-boot image (tests/realboot/image.py).  iproute2: the VM guests' `ip link add` (a
# forged rtnl-link- request name, tests/vm/bpf_guest.py; a Debian 13 minbase lacks it).
APT_PACKAGES := kmod libkmod2 python3-venv \
                qemu-system-x86 udev systemd util-linux procps psmisc busybox-static \
                ca-certificates file initramfs-tools zstd xz-utils cpio \
                clang libbpf-dev libbpf1 systemd-journal-remote debootstrap e2fsprogs \
                iproute2

# The kernel layer's BPF object (kmodd/bpf/kmodd.bpf.c): built here, shipped as package
# data, so the target needs no compiler.  -g emits the BTF that CO-RE and libbpf need.
BPF_OBJ     := kmodd/bpf/kmodd.bpf.o
BPF_CFLAGS  := -O2 -g -Wall -Werror -target bpf -I/usr/include/$(shell uname -m)-linux-gnu

.PHONY: help apt apt-list venv bpf kernel-tree promtool trixie-chroot deb test test-fast \
        test-realboot realboot-bookworm-venv realboot-trixie-deb test-debian13 lint demo \
        bench clean

help:
	@echo "make test         install everything, then run the whole suite and both real"
	@echo "                  boots (what CI runs; REALBOOT_ROUTES= leaves the boots out)"
	@echo "make test-realboot  one real boot, systemd as PID 1 (docs/vm.md; root)"
	@echo "make demo         boot a real kernel with kmodd as its modprobe helper"
	@echo "make bench        benchmarks against kmod, written to docs/benchmarks.md"
	@echo "make test-fast    the suite without the VM, oracle and package tests"
	@echo "make test-debian13  the suite in a Debian 13 tree (root; tools/test-debian13)"
	@echo "make lint         ruff + mypy --strict"
	@echo "make deb          the Debian 13 package, built in a trixie chroot, into dist/"

# Install missing apt packages (needs root).  dpkg-query keeps a warm machine fast.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" != 0 ]; then echo "need root to install: $$missing" >&2; exit 1; fi; \
	    echo "apt: installing $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

apt-list:
	@echo $(APT_PACKAGES)

$(VENV)/.stamp: pyproject.toml | apt
	$(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test]'
	touch $@

venv: apt $(VENV)/.stamp bpf

bpf: $(BPF_OBJ)

$(BPF_OBJ): kmodd/bpf/kmodd.bpf.c | apt
	clang $(BPF_CFLAGS) -c $< -o $@.tmp && mv $@.tmp $@

# Debian 12's and Debian 13's kernel trees and Debian 13's kmod 34.2 (tests/kerneltree.py).
kernel-tree: venv
	$(VPY) -m tests.kerneltree

# promtool (`promtool check metrics`, tests/daemon/test_metrics.py): Debian 13 packages it
# alone (`promtool`); Debian 12 only inside `prometheus`, whose one 48 MB binary is taken
# out of the 19 MB .deb (apt-get download, no install), since installing the package would
# add the 50 MB server, its web assets and a prometheus.service listening on :9090 to every
# CI machine.  ~5 s, once (cached).
PROMTOOL    := .cache/promtool/promtool
promtool: $(PROMTOOL)

PROMTOOL_DEB = apt-get download -qq promtool 2>/dev/null || apt-get download -qq prometheus
$(PROMTOOL):
	rm -rf $(@D)/deb && mkdir -p $(@D)/deb
	cd $(@D)/deb && { { $(PROMTOOL_DEB); } || \
	    { apt-get update -qq && { $(PROMTOOL_DEB); }; }; }
	dpkg-deb --fsys-tarfile $(@D)/deb/*.deb | tar -xO ./usr/bin/promtool > $@.tmp
	chmod 755 $@.tmp && $@.tmp --version >/dev/null && mv $@.tmp $@ && rm -rf $(@D)/deb

# Optional: a Debian 13 chroot for experiments with its kmod 34.2 (the tests do not need
# it: they run kmod 34 from the extracted packages).  ~80 s from deb.debian.org.
TRIXIE_CHROOT ?= /var/cache/kmodd-dev/trixie
trixie-chroot:
	@command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
	test -x $(TRIXIE_CHROOT)/usr/bin/kmod || { rm -rf $(TRIXIE_CHROOT).tmp && \
	    debootstrap --variant=minbase --include=kmod trixie $(TRIXIE_CHROOT).tmp http://deb.debian.org/debian && \
	    mv $(TRIXIE_CHROOT).tmp $(TRIXIE_CHROOT); }
	chroot $(TRIXIE_CHROOT) modprobe --version

# The Debian 13 package (debian/), built with dpkg-buildpackage in a cached trixie chroot
# (/var/cache/kmodd-dev/trixie-build, from the machine's Debian mirror) and checked with
# lintian (errors fail): dist/kmodd_VERSION_ARCH.deb, dist/build.log, dist/lintian.txt.
deb:
	packaging/debian13.sh build dist

# `make test` is the suite, then the real boots (tests/realboot: a debootstrapped image,
# systemd as PID 1) of both routes side by side: Debian 12 with README.md's venv, Debian
# 13 with the .deb.  -j2 because each boot is one TCG vCPU: both took 12-14 min here
# together, image layers rebuilt (docs/vm.md).  --output-sync keeps each route's report
# whole.  REALBOOT_ROUTES= leaves them out (tools/test-debian13 does: the Debian 13 tree
# runs the suite, the host boots the images); REALBOOT_ARGS are their pytest arguments.
REALBOOT_ROUTES ?= bookworm-venv trixie-deb
REALBOOT_ARGS   ?= -v -p no:randomly
REALBOOT_PYTEST  = $(VPY) -m pytest -p no:cacheprovider -m realboot tests/realboot $(REALBOOT_ARGS)

test: venv kernel-tree promtool
	$(VPY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)
ifneq ($(strip $(REALBOOT_ROUTES)),)
	$(MAKE) --no-print-directory -j2 --output-sync=target $(addprefix realboot-,$(REALBOOT_ROUTES))
endif

test-fast: venv promtool
	$(VPY) -m pytest -p no:cacheprovider -m 'not vm and not oracle and not deb' $(PYTEST_ARGS)

# One real-boot route as KMODD_REALBOOT_RELEASE / KMODD_REALBOOT_INSTALL say (default
# Debian 12, venv; root); `make test` runs both routes below.
test-realboot: venv kernel-tree
	$(REALBOOT_PYTEST)

realboot-bookworm-venv: venv kernel-tree
	KMODD_REALBOOT_RELEASE=bookworm KMODD_REALBOOT_INSTALL=venv $(REALBOOT_PYTEST)

realboot-trixie-deb: venv kernel-tree
	KMODD_REALBOOT_RELEASE=trixie KMODD_REALBOOT_INSTALL=deb $(REALBOOT_PYTEST)

# The suite on Debian 13 (debootstrap trixie, pivot_root into it, make test inside; root;
# cached tree): tools/test-debian13 says how and how long.  Not part of `make test`.
DEBIAN13_ARGS ?= test
test-debian13:
	tools/test-debian13 $(DEBIAN13_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo: venv kernel-tree
	$(VPY) -m tests.vm.demo

# bench ends with one VM boot for the kernel layer's figures (bench/kernel_vm.py, ~10-15
# min under TCG); BENCH_ARGS=--no-vm skips it.  KMODD_VM_WRAPPER prefixes only that boot
# (on the shared dev machine: KMODD_VM_WRAPPER=/work/coord/vmslot).
bench: venv kernel-tree
	$(VPY) -m bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info $(BPF_OBJ)
