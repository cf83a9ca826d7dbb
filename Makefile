# tapio-node developer entry points. Every target that needs the machine
# prepared depends on `deps`, so each works by itself on a fresh Debian 12
# machine, as root.

PY        ?= /usr/bin/python3
VENV      ?= .venv
VPY       := $(VENV)/bin/python
APT_PKGS  := clang llvm libbpf-dev bpftool libelf-dev zlib1g-dev pkg-config \
             libsystemd-dev python3-venv python3-dev gcc make util-linux \
             iproute2 systemd procps prometheus liburing-dev \
             qemu-system-x86 udev kmod busybox-static \
             mmdebstrap umoci podman runc
PY_DEPS   := setuptools wheel cython msgspec pyyaml prometheus-client inotify-simple \
             systemd-python pytest lightkube virtme-ng kubernetes-validate

.PHONY: all deps venv build bpf verify test test-fast vmtest vmbench demo bench deb image clean mounts

all: build

# System packages, installed only when one is missing.
deps:
	@missing=$$(for p in $(APT_PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing: $$missing"; \
	  apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing; \
	fi

$(VENV)/.deps: pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q $(PY_DEPS)
	touch $@

venv: deps $(VENV)/.deps

# The CO-RE object and the Cython extension, in place.
build: venv
	$(VPY) setup.py -q build_bpf build_ext --inplace
	$(VPY) -m pip install -q --no-build-isolation --no-deps -e .

# tracefs and bpffs, mounted only if absent (tracepoints and pins need them).
mounts:
	@mountpoint -q /sys/kernel/tracing || mount -t tracefs tracefs /sys/kernel/tracing
	@mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf

# Load every program through the kernel verifier.
verify: build mounts
	$(VPY) -m tapio_node.kernel.verify

# The whole suite on this kernel, then on Debian 12's kernel in a VM the
# kernel subset (plain: the lsm backend, bpf being in its built-in LSM list;
# 6.1+fentry booted with an lsm= without bpf: the fentry backend) and the .deb booted with systemd (TEST_KERNELS=, empty
# for none; TEST_VM_SUBSETS= which of the two).
TEST_KERNELS ?= 6.1 6.1+fentry
TEST_VM_SUBSETS ?= matrix packaging
test: build mounts
	$(VPY) -m pytest -ra tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests"; exit 1; fi; \
	[ $$rc -eq 0 ] || exit $$rc; \
	if [ -n "$(TEST_KERNELS)" ]; then \
	  $(VPY) -m tests.vm.matrix --kernels "$(TEST_KERNELS)" --subset "$(TEST_VM_SUBSETS)"; fi

# The kernel matrix: Debian 11/12/13/14 kernels in VMs and this machine's
# kernel (KERNELS= picks; VM_SUBSET=kernel runs all of tests/kernel).
KERNELS ?= 5.10 6.1 6.1+fentry 6.12 6.12+fentry 7.2 host
vmtest: build mounts
	$(VPY) -m tests.vm.matrix --kernels "$(KERNELS)"

# The per-syscall benchmark in a VM, the baseline and each hook backend
# interleaved on one kernel (KERNEL=, BACKENDS=, ROUNDS=).
KERNEL ?= 6.12
BACKENDS ?= tracepoint fentry lsm
vmbench: build mounts
	KERNEL="$(KERNEL)" BACKENDS="$(BACKENDS)" $(VPY) -m bench.vm

test-fast: build
	$(VPY) -m pytest -q tests/unit

demo: build mounts
	$(VENV)/bin/tapio-node demo

bench: build mounts
	$(VPY) -m bench

deb: deps
	$(MAKE) -C packaging deb

# The container image (deploy/kubernetes/ runs it): an OCI image archive
# made from the .deb on a Debian 12 root by mmdebstrap and umoci, no base
# image pulled (deploy/image/build.sh). Load it with
# `podman load -i $(IMAGE)` or `skopeo copy oci-archive:$(IMAGE) docker://...`.
# IMAGE_REF= is the name:tag recorded in it (remove the archive to rename).
VERSION   := $(shell sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml)
ARCH      := $(shell dpkg --print-architecture)
IMAGE_REF ?= tapio-node:$(VERSION)
IMAGE     := build/image/tapio-node_$(VERSION)_$(ARCH).oci.tar
DEB       := packaging/build/tapio-node_$(VERSION)_$(ARCH).deb
image: deps
	$(MAKE) -C packaging deb
	$(MAKE) --no-print-directory $(IMAGE)
	@echo "image: $(IMAGE) $(IMAGE_REF)"

$(IMAGE): $(DEB) deploy/image/build.sh
	deploy/image/build.sh $(DEB) $@ $(IMAGE_REF)

clean:
	rm -rf build $(VENV) *.egg-info tapio_node/*.so tapio_node/kernel/obj _fast/*.c
