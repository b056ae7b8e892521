"""Facts about the host kernel that the daemon and kmodctl both need, read the same way.

    host.modprobe_path  the kernel.modprobe sysctl (point it at the helper, restore it)
    host.kconfig        the kernel's .config (CONFIG_STATIC_USERMODEHELPER)
    host.cmdline        the kernel command line's kmodd.mode= escape hatch

Imports nothing from kmodd.daemon or kmodd.cli (tests/test_linters.py checks it).
"""
