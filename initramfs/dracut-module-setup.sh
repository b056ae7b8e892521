#!/bin/bash
# dracut module 90kmodd (/usr/lib/dracut/modules.d/90kmodd/module-setup.sh, installed by
# `kmodctl install`): kmodd's rendered module denies into the image, so the initramfs's
# udev and modprobe refuse denied modules before kmodd runs.  dracut copies
# /etc/modprobe.d only in hostonly mode and /run/modprobe.d never; kmodd-initramfs writes
# the rendered file straight into $initdir, in both modes.

# Included by default when installed (0); `omit_dracutmodules+=" kmodd "` leaves it out.
check() {
	return 0
}

depends() {
	return 0
}

install() {
	@LIBEXEC@/kmodd-initramfs "$initdir" || {
		derror "kmodd: could not put the module denies into the image"
		return 1
	}
}
