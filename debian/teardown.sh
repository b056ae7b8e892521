# kmodd teardown, shared by prerm (remove) and postrm (remove, purge): debian/rules pastes
# it into both (postrm runs when the package's files are gone, so it can call nothing of
# kmodd's).  Idempotent: each step checks before it acts.  tests/packaging/test_teardown.py
# runs these functions against a scratch tree (the variables below).
kmodd_helper=/usr/libexec/kmodd/kmodd-modprobe
kmodd_sysctl=/proc/sys/kernel/modprobe
kmodd_run=/run
kmodd_pins=/sys/fs/bpf/kmodd

# kernel.modprobe back to what kmodd replaced (the daemon remembers it in
# /run/kmodd/modprobe_path.previous), else the kernel's default; only when it is ours.
kmodd_restore_modprobe() {
	[ -w "$kmodd_sysctl" ] || return 0
	current=$(cat "$kmodd_sysctl" 2>/dev/null) || return 0
	[ "$current" = "$kmodd_helper" ] || return 0
	previous=$(head -n1 "$kmodd_run/kmodd/modprobe_path.previous" 2>/dev/null || true)
	case "$previous" in
	/*) ;;
	*) previous=/sbin/modprobe ;;
	esac
	[ "$previous" != "$kmodd_helper" ] || previous=/sbin/modprobe
	echo "$previous" >"$kmodd_sysctl" || true
	echo "kmodd: kernel.modprobe restored to $previous"
}

# What the daemon published: its deny file would go on refusing modules nobody manages;
# the BPF LSM programs detach once their pins go (the daemon is stopped by then).
kmodd_remove_runtime() {
	rm -f "$kmodd_run/modprobe.d/00-kmodd.conf" "$kmodd_run/kmodd/snapshot" \
		"$kmodd_run/kmodd/published" "$kmodd_run/kmodd/modprobe_path.previous"
	if [ -d "$kmodd_pins" ]; then
		rm -f "$kmodd_pins"/* || true
		rmdir "$kmodd_pins" || true
	fi
}
