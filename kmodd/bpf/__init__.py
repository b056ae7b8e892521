"""The kernel layer: a BPF LSM program (kmodd.bpf.c, GPL) on the module hooks, the
libbpf binding that loads and pins it, its map layout, and detection.  Imports nothing
from policy/daemon/cli."""
