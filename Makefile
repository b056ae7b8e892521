# kmodd — one entry point for humans and CI.  `make test` and `make demo` install
# everything they need on a fresh Debian 12 machine (run as root).

PYTHON      ?= /usr/bin/python3
VENV        := .venv
VPY         := $(VENV)/bin/python
# apt packages: kmod is the oracle (modprobe/depmod) and libkmod; libsystemd-dev,
# pkg-config, gcc and python3-dev build systemd-python; qemu runs the real kernel;
# udev/systemd give the real udevd and journald the runtime tests talk to; virtme-ng
# reads the kernel release of a vmlinuz with file(1); initramfs-tools (mkinitramfs,
# lsinitramfs, unmkinitramfs), zstd and cpio build and read real initramfs images for the
# early-boot hook's tests (~2.5 s per image); clang (bpf target) and libbpf-dev
# (bpf_helpers.h) build the kernel layer's BPF object, libbpf1 loads it.  debootstrap and
# e2fsprogs (mkfs.ext4 -d, debugfs: no loop device) build the real-boot image
# (tests/realboot/image.py).
APT_PACKAGES := kmod libkmod2 libsystemd-dev pkg-config gcc python3-dev python3-venv \
                qemu-system-x86 udev systemd util-linux procps psmisc busybox-static \
                ca-certificates file initramfs-tools zstd cpio \
                clang libbpf-dev libbpf1 debootstrap e2fsprogs

# The kernel layer's BPF object (kmodd/bpf/kmodd.bpf.c): built here, shipped as package
# data, so the target needs no compiler.  -g emits the BTF that CO-RE and libbpf need.
BPF_OBJ     := kmodd/bpf/kmodd.bpf.o
BPF_CFLAGS  := -O2 -g -Wall -Werror -target bpf -I/usr/include/$(shell uname -m)-linux-gnu

.PHONY: help apt venv bpf kernel-tree trixie-chroot test test-fast lint demo bench clean

help:
	@echo "make test         install everything, then run the whole suite (what CI runs)"
	@echo "make demo         boot a real kernel with kmodd as its modprobe helper"
	@echo "make bench        benchmarks against kmod, written to docs/benchmarks.md"
	@echo "make test-fast    the suite without the VM and oracle tests"
	@echo "make lint         ruff + mypy --strict"

# Install missing apt packages (needs root).  dpkg-query keeps a warm machine fast.
apt:
	@missing=$$(for p in $(APT_PACKAGES); do \
	    dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" != 0 ]; then echo "need root to install: $$missing" >&2; exit 1; fi; \
	    echo "apt: installing $$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

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

# Optional: a Debian 13 chroot for experiments with its kmod 34.2 (the tests do not need
# it: they run kmod 34 from the extracted packages).  ~80 s from deb.debian.org.
TRIXIE_CHROOT ?= /var/cache/kmodd-dev/trixie
trixie-chroot:
	@command -v debootstrap >/dev/null || { apt-get update -qq && apt-get install -y -qq debootstrap; }
	test -x $(TRIXIE_CHROOT)/usr/bin/kmod || { rm -rf $(TRIXIE_CHROOT).tmp && \
	    debootstrap --variant=minbase --include=kmod trixie $(TRIXIE_CHROOT).tmp http://deb.debian.org/debian && \
	    mv $(TRIXIE_CHROOT).tmp $(TRIXIE_CHROOT); }
	chroot $(TRIXIE_CHROOT) modprobe --version

test: venv kernel-tree
	$(VPY) -m pytest -p no:cacheprovider $(PYTEST_ARGS)

test-fast: venv
	$(VPY) -m pytest -p no:cacheprovider -m 'not vm and not oracle' $(PYTEST_ARGS)

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

demo: venv kernel-tree
	$(VPY) -m tests.vm.demo

bench: venv kernel-tree
	$(VPY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info $(BPF_OBJ)
