#!/bin/sh
# Debian 13 "trixie" chroots for kmodd's package (make deb, tests/packaging).
#
#   packaging/debian13.sh base           the pristine minbase chroot (cached)
#   packaging/debian13.sh build OUTDIR   build the .deb in the cached build chroot
#   packaging/debian13.sh run DIR CMD..  run CMD in chroot DIR (/proc, /dev, the apt cache)
#
# Caches (outside the checkout, per machine; KMODD_DEV_CACHE moves them):
#   trixie-base/      debootstrap --variant=minbase trixie (~40 s), never modified: the
#                     test copies it for each fresh install chroot
#   trixie-build/     a copy of it with the build dependencies; apt-get update and the
#                     build-deps install re-run when debian/control changed or daily
#   trixie-archives/  apt's .deb cache, shared by every chroot (warm installs download
#                     nothing)
# The mirror is the machine's own Debian mirror (its apt sources), KMODD_DEBIAN_MIRROR
# overrides it.  Needs root (debootstrap, chroot, mounts in a private mount namespace).
set -eu

CACHE=${KMODD_DEV_CACHE:-/var/cache/kmodd-dev}
BASE=$CACHE/trixie-base
BUILD=$CACHE/trixie-build
ARCHIVES=$CACHE/trixie-archives
SUITE=trixie
HERE=$(cd "$(dirname "$0")/.." && pwd)
# What debian/control's Build-Depends need, plus lintian (dpkg-buildpackage checks the
# list against debian/control: a missing one fails the build, it cannot drift silently).
BUILD_PACKAGES="build-essential fakeroot debhelper dh-python pybuild-plugin-pyproject
python3-all python3-setuptools clang libbpf-dev lintian"

die() {
	echo "debian13.sh: $*" >&2
	exit 1
}

# The first non-security Debian URI of the machine's apt sources (one-line and deb822).
mirror() {
	if [ -n "${KMODD_DEBIAN_MIRROR:-}" ]; then
		echo "$KMODD_DEBIAN_MIRROR"
		return
	fi
	{
		cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null |
			awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z+]+:\/\//) { print $i; break } }'
		cat /etc/apt/sources.list.d/*.sources 2>/dev/null |
			awk '$1 == "URIs:" { for (i = 2; i <= NF; i++) print $i }'
	} | grep -v security | head -n1 | grep . || echo http://deb.debian.org/debian
}

# run DIR CMD...: in a private mount namespace, so the mounts vanish with the command.
# The archive dir is shared by every chroot, and apt does not wait for its lock (two at
# once: "Could not get lock /var/cache/apt/archives/lock"): one command at a time.
run() {
	root=$1
	shift
	mkdir -p "$ARCHIVES/partial"
	cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
	flock "$ARCHIVES/.kmodd-lock" unshare --mount --propagation private --fork sh -euc '
		root=$1 archives=$2
		shift 2
		mount -t proc proc "$root/proc"
		mount --rbind /dev "$root/dev"
		mount --bind "$archives" "$root/var/cache/apt/archives"
		exec chroot "$root" env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
			LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
	' sh "$root" "$ARCHIVES" "$@"
}

base() {
	[ "$(id -u)" = 0 ] || die "needs root (debootstrap)"
	if [ -x "$BASE/usr/bin/apt-get" ]; then
		return
	fi
	command -v debootstrap >/dev/null || {
		apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null
	}
	mkdir -p "$CACHE" "$ARCHIVES"
	rm -rf "$BASE.tmp"
	echo "debian13.sh: debootstrap $SUITE from $(mirror) into $BASE"
	debootstrap --variant=minbase --cache-dir="$ARCHIVES" "$SUITE" "$BASE.tmp" "$(mirror)" \
		>"$CACHE/trixie-base.log" 2>&1 || die "debootstrap failed: see $CACHE/trixie-base.log"
	printf 'deb %s %s main\n' "$(mirror)" "$SUITE" >"$BASE.tmp/etc/apt/sources.list"
	# Keep the .debs apt fetches (the shared archive dir) instead of deleting them.
	rm -f "$BASE.tmp/etc/apt/apt.conf.d/docker-clean"
	echo 'Binary::apt::APT::Keep-Downloaded-Packages "true";' \
		>"$BASE.tmp/etc/apt/apt.conf.d/10kmodd-keep"
	mv "$BASE.tmp" "$BASE"
}

# The build chroot, updated when debian/control changed or once a day.
build_chroot() {
	base
	if [ ! -x "$BUILD/usr/bin/apt-get" ]; then
		rm -rf "$BUILD.tmp"
		cp -a "$BASE" "$BUILD.tmp"
		mv "$BUILD.tmp" "$BUILD"
	fi
	stamp=$BUILD/.kmodd-build-deps
	want=$(cat "$HERE/debian/control" | cksum)-$(date -u +%F)
	if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
		echo "debian13.sh: updating $BUILD"
		# shellcheck disable=SC2086 # the list is words on purpose (one line: echo)
		packages=$(echo $BUILD_PACKAGES)
		run "$BUILD" sh -c "apt-get update -qq && apt-get -y -qq dist-upgrade >/dev/null &&
			apt-get install -y -qq --no-install-recommends $packages >/dev/null" \
			>"$CACHE/trixie-build.log" 2>&1 || die "apt in $BUILD failed: see $CACHE/trixie-build.log"
		echo "$want" >"$stamp"
	fi
}

# build OUTDIR: the checkout's files (tracked and untracked-not-ignored, as in the work tree, so
# uncommitted edits count) into the build chroot, dpkg-buildpackage -b, lintian; .deb and logs to OUTDIR.
build() {
	out=$1
	build_chroot
	src=$BUILD/build/kmodd
	rm -rf "$BUILD/build"
	mkdir -p "$src" "$out"
	(cd "$HERE" && git ls-files -z --cached --others --exclude-standard | tar --null -T - -cf -) | tar -C "$src" -xf -
	run "$BUILD" sh -c 'cd /build/kmodd && dpkg-buildpackage -us -uc -b' \
		>"$out/build.log" 2>&1 || {
		tail -n 40 "$out/build.log" >&2
		die "dpkg-buildpackage failed: see $out/build.log"
	}
	run "$BUILD" sh -c 'lintian --info --display-info --pedantic /build/*.changes' \
		>"$out/lintian.txt" 2>&1 || true
	rm -f "$out"/kmodd_*.deb
	cp "$BUILD"/build/kmodd_*.deb "$out/"
	grep -q '^E:' "$out/lintian.txt" && {
		cat "$out/lintian.txt" >&2
		die "lintian reports errors ($out/lintian.txt)"
	}
	echo "debian13.sh: $(ls "$out"/kmodd_*.deb); lintian: $(grep -c '^W:' "$out/lintian.txt") warnings, $(grep -c '^I:' "$out/lintian.txt") infos ($out/lintian.txt)"
}

case "${1:-}" in
base) base ;;
build) build "${2:?usage: debian13.sh build OUTDIR}" ;;
run)
	shift
	run "$@"
	;;
mirror) mirror ;;
*) die "usage: debian13.sh base | build OUTDIR | run DIR CMD... | mirror" ;;
esac
