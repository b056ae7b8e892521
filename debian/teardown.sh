# kmodd teardown, shared by prerm (remove) and postrm (remove, purge): debian/rules pastes
# it into both (postrm runs when the package's files are gone, so it can call nothing of
# kmodd's).  Idempotent: each step checks before it acts.
kmodd_helper=/usr/libexec/kmodd/kmodd-modprobe

# kernel.modprobe back to what kmodd replaced (the daemon remembers it in
# /run/kmodd/modprobe_path.previous), else the kernel's default; only when it is ours.
kmodd_restore_modprobe() {
	[ -w /proc/sys/kernel/modprobe ] || return 0
	current=$(cat /proc/sys/kernel/modprobe 2>/dev/null) || return 0
	[ "$current" = "$kmodd_helper" ] || return 0
	previous=$(head -n1 /run/kmodd/modprobe_path.previous 2>/dev/null || true)
	case "$previous" in
	/*) ;;
	*) previous=/sbin/modprobe ;;
	esac
	[ "$previous" != "$kmodd_helper" ] || previous=/sbin/modprobe
	echo "$previous" >/proc/sys/kernel/modprobe || true
	echo "kmodd: kernel.modprobe restored to $previous"
}

# What the daemon published: its deny file would go on refusing modules nobody manages;
# the BPF LSM programs detach once their pins go (the daemon is stopped by then).
kmodd_remove_runtime() {
	rm -f /run/modprobe.d/00-kmodd.conf /run/kmodd/snapshot /run/kmodd/published \
		/run/kmodd/modprobe_path.previous
	if [ -d /sys/fs/bpf/kmodd ]; then
		rm -f /sys/fs/bpf/kmodd/* || true
		rmdir /sys/fs/bpf/kmodd || true
	fi
}
