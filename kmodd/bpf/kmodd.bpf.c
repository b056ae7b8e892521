// SPDX-License-Identifier: GPL-2.0-only
/*
 * kmodd's kernel layer: BPF LSM programs on the module hooks.
 *
 * GPL because the kernel loads LSM programs only with a GPL-compatible licence
 * (kernel/bpf/bpf_lsm.c, bpf_lsm_verify_prog).  The rest of kmodd keeps its licence; this
 * file only talks to it through maps (layout mirrored in kmodd/bpf/layout.py).
 *
 * CO-RE without vmlinux.h: the few kernel structs read here are declared below with only
 * the fields used, marked preserve_access_index, and libbpf relocates every access against
 * the running kernel's BTF (/sys/kernel/btf/vmlinux) at load.  A generated vmlinux.h
 * would be ~3 MB of a given kernel's types in the repository (or bpftool plus a kernel's
 * BTF at build time) for six structs.
 *
 * Hooks (include/linux/lsm_hook_defs.h, 6.1 and 6.12):
 *   kernel_module_request(char *kmod_name)            requester's context, before the helper
 *   kernel_read_file(struct file *, enum id, bool)    finit_module: the module file is known
 *   kernel_load_data(enum id, _Bool contents)          init_module: a blob, no file identity
 * Each returns 0 or -EPERM; `ret` (BPF_PROG's last argument) is an earlier LSM's verdict
 * and is kept when it already refuses.
 */
#include <linux/types.h>
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>
#include <bpf/bpf_core_read.h>

char LICENSE[] SEC("license") = "GPL";

#define EPERM 1
/* MODULE_NAME_LEN (64 - sizeof(unsigned long)): __request_module refuses longer names
 * with -ENAMETOOLONG before the LSM hook, so every request name fits with its NUL. */
#define NAME_LEN 56
#define COMM_LEN 16
#define CONDS_MAX 8
/* enum kernel_read_file_id / kernel_load_data_id (include/linux/kernel_read_file.h):
 * UNKNOWN, FIRMWARE, MODULE, ... -- MODULE has been 2 in both since 5.10. */
#define READING_MODULE 2
#define LOADING_MODULE 2
/* PROC_USER_INIT_INO (include/linux/proc_ns.h): the initial user namespace's inum. */
#define USER_NS_INIT_INO 0xEFFFFFFDU

/* ---- the kernel's types, only what is read (CO-RE relocated) ---- */
typedef struct { __u32 val; } kuid_t;
typedef struct { __u32 val; } kgid_t;

struct ns_common { unsigned int inum; } __attribute__((preserve_access_index));
struct user_namespace { struct ns_common ns; } __attribute__((preserve_access_index));
struct cred {
	kuid_t uid;
	kgid_t gid;
	kuid_t euid;
	struct user_namespace *user_ns;
} __attribute__((preserve_access_index));
struct task_struct {
	int pid;
	int tgid;
	const struct cred *cred;
	kuid_t loginuid;        /* CONFIG_AUDIT (=y on Debian) */
	unsigned int sessionid;
} __attribute__((preserve_access_index));
struct super_block { unsigned int s_dev; } __attribute__((preserve_access_index));
struct qstr { const unsigned char *name; } __attribute__((preserve_access_index));
struct dentry { struct qstr d_name; } __attribute__((preserve_access_index));
struct inode {
	unsigned long i_ino;
	struct super_block *i_sb;
} __attribute__((preserve_access_index));
struct path { struct dentry *dentry; } __attribute__((preserve_access_index));
struct file {
	struct path f_path;
	struct inode *f_inode;
} __attribute__((preserve_access_index));

/* ---- maps: the daemon's side (kmodd/bpf/layout.py) ---- */
enum verdict { V_PASS = 0, V_ALLOW = 1, V_DENY = 2 };
enum action { A_PASSED = 0, A_ALLOWED = 1, A_DENIED = 2, A_WOULD_DENY = 3 };
enum kind { K_REQUEST = 1, K_READ_FILE = 2, K_LOAD_DATA = 3 };
enum cond_flag {
	C_UID = 1,          /* uid_lo <= uid <= uid_hi */
	C_EUID = 2,
	C_GID = 4,
	C_UNPRIVILEGED = 8, /* uid != 0 (policy/requester.py: the real uid) */
	C_PRIVILEGED = 16,  /* uid == 0 */
	C_USERNS = 32,      /* credentials of a non-initial user namespace */
	C_INIT_USERNS = 64,
};
enum { MODE_ENFORCE = 0, MODE_PERMISSIVE = 1 };
enum { STAT_REQUESTS, STAT_DENIED, STAT_WOULD_DENY, STAT_FILES_DENIED,
       STAT_LOAD_DATA_DENIED, STAT_DROPPED, STAT_MAX };

struct config {
	__u32 mode;
	__u32 load_data;      /* verdict for init_module from memory (LOADING_MODULE) */
	__u32 generation;
	__u32 pad;
};

struct name_key { char name[NAME_LEN]; };

struct cond {
	__u32 flags;
	__u32 verdict;
	__u32 rule;           /* the daemon's rule index, echoed in the event */
	__u32 uid_lo, uid_hi, euid_lo, euid_hi, gid_lo, gid_hi;
};

struct name_entry {
	__u32 nconds;
	__u32 fallback;       /* verdict when no condition matches */
	__u32 fallback_rule;
	__u32 pad;
	struct cond conds[CONDS_MAX];
};

struct file_key { __u64 dev; __u64 ino; };
struct file_entry { __u32 verdict; __u32 rule; };

struct event {
	__u64 ktime_ns;
	__u64 cgroup_id;
	__u64 dev;
	__u64 ino;
	__u32 kind, action, verdict, rule;
	__u32 generation, pid, tgid, uid;
	__u32 euid, gid, loginuid, sessionid;
	__u32 userns_inum, mode;
	char comm[COMM_LEN];
	char name[NAME_LEN];
};

/* The layout kmodd/bpf/layout.py mirrors (tests/bpf/test_layout.py reads these lines). */
_Static_assert(sizeof(struct config) == 16, "config");
_Static_assert(sizeof(struct name_key) == 56, "name_key");
_Static_assert(sizeof(struct cond) == 36, "cond");
_Static_assert(sizeof(struct name_entry) == 304, "name_entry");
_Static_assert(sizeof(struct file_key) == 16, "file_key");
_Static_assert(sizeof(struct file_entry) == 8, "file_entry");
_Static_assert(sizeof(struct event) == 160, "event");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} kmodd_config SEC(".maps");

/* One generation's tables are inner maps: the daemon builds a new one, fills it, then
 * swaps slot 0 of the outer array (one RCU pointer store: a hook sees the old generation
 * or the new one, never half of each).  A hash inner map's max_entries may differ from
 * this template's (kernel/bpf/map_in_map.c compares type, sizes and flags only). */
struct names_inner {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	/* sizes, not __type: clang emits types reached only through an inner map's
	 * pointer as BTF forward declarations, which libbpf cannot size */
	__uint(key_size, sizeof(struct name_key));
	__uint(value_size, sizeof(struct name_entry));
};
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct names_inner);
} kmodd_names SEC(".maps");

struct files_inner {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1);
	__uint(key_size, sizeof(struct file_key));
	__uint(value_size, sizeof(struct file_entry));
};
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY_OF_MAPS);
	__uint(max_entries, 1);
	__type(key, __u32);
	__array(values, struct files_inner);
} kmodd_files SEC(".maps");

/* 256 KiB: ~1,600 events of 160 bytes (+8 header) -- a whole boot's autoloads (~100-300)
 * many times over while the daemon is busy; a full ring counts STAT_DROPPED, the verdict
 * never depends on it. */
struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 256 * 1024);
} kmodd_events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} kmodd_stats SEC(".maps");

static __always_inline void count(__u32 stat)
{
	__u64 *n = bpf_map_lookup_elem(&kmodd_stats, &stat);
	if (n)
		*n += 1;
}

static __always_inline struct config current_config(void)
{
	__u32 zero = 0;
	struct config cfg = {};
	struct config *found = bpf_map_lookup_elem(&kmodd_config, &zero);
	if (found)
		cfg = *found;
	return cfg;
}

struct facts { __u32 uid, euid, gid, userns; };

static __always_inline struct facts task_facts(struct task_struct *task)
{
	const struct cred *cred = BPF_CORE_READ(task, cred);
	struct facts f = {
		.uid = BPF_CORE_READ(cred, uid.val),
		.euid = BPF_CORE_READ(cred, euid.val),
		.gid = BPF_CORE_READ(cred, gid.val),
		.userns = BPF_CORE_READ(cred, user_ns, ns.inum),
	};
	return f;
}

static __always_inline int in_range(__u32 v, __u32 lo, __u32 hi)
{
	return lo <= v && v <= hi;
}

static __always_inline int cond_matches(const struct cond *c, const struct facts *f)
{
	__u32 fl = c->flags;
	if ((fl & C_UID) && !in_range(f->uid, c->uid_lo, c->uid_hi))
		return 0;
	if ((fl & C_EUID) && !in_range(f->euid, c->euid_lo, c->euid_hi))
		return 0;
	if ((fl & C_GID) && !in_range(f->gid, c->gid_lo, c->gid_hi))
		return 0;
	if ((fl & C_UNPRIVILEGED) && f->uid == 0)
		return 0;
	if ((fl & C_PRIVILEGED) && f->uid != 0)
		return 0;
	if ((fl & C_USERNS) && f->userns == USER_NS_INIT_INO)
		return 0;
	if ((fl & C_INIT_USERNS) && f->userns != USER_NS_INIT_INO)
		return 0;
	return 1;
}

/* First matching condition wins, as the policy's first-match rules do. */
static __always_inline __u32 decide(const struct name_entry *e, const struct facts *f,
				    __u32 *rule)
{
	for (int i = 0; i < CONDS_MAX; i++) {
		if (i >= e->nconds)
			break;
		if (cond_matches(&e->conds[i], f)) {
			*rule = e->conds[i].rule;
			return e->conds[i].verdict;
		}
	}
	*rule = e->fallback_rule;
	return e->fallback;
}

static __always_inline __u32 act(__u32 verdict, const struct config *cfg)
{
	if (verdict == V_DENY)
		return cfg->mode == MODE_PERMISSIVE ? A_WOULD_DENY : A_DENIED;
	return verdict == V_ALLOW ? A_ALLOWED : A_PASSED;
}

static __always_inline void emit(__u32 kind, __u32 action, __u32 verdict, __u32 rule,
				 const struct config *cfg, const char *name,
				 __u64 dev, __u64 ino)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct facts f = task_facts(task);
	struct event *ev = bpf_ringbuf_reserve(&kmodd_events, sizeof(*ev), 0);
	if (!ev) {
		count(STAT_DROPPED);
		return;
	}
	ev->ktime_ns = bpf_ktime_get_boot_ns();
	ev->cgroup_id = bpf_get_current_cgroup_id();
	ev->dev = dev;
	ev->ino = ino;
	ev->kind = kind;
	ev->action = action;
	ev->verdict = verdict;
	ev->rule = rule;
	ev->generation = cfg->generation;
	ev->pid = BPF_CORE_READ(task, pid);
	ev->tgid = BPF_CORE_READ(task, tgid);
	ev->uid = f.uid;
	ev->euid = f.euid;
	ev->gid = f.gid;
	ev->loginuid = BPF_CORE_READ(task, loginuid.val);
	ev->sessionid = BPF_CORE_READ(task, sessionid);
	ev->userns_inum = f.userns;
	ev->mode = cfg->mode;
	bpf_get_current_comm(ev->comm, sizeof(ev->comm));
	__builtin_memset(ev->name, 0, sizeof(ev->name));
	if (name)
		bpf_probe_read_kernel_str(ev->name, sizeof(ev->name), name);
	bpf_ringbuf_submit(ev, 0);
}

static __always_inline int result(__u32 action)
{
	return action == A_DENIED ? -EPERM : 0;
}

/* The table is keyed as kmod looks names up (alias_normalize: '-' is '_').  A name with
 * '[' would keep '-' inside the brackets: rather than mirror that, it is never looked up
 * by name (returns 0): the "" entry, for every name not in the table, decides it. */
static __always_inline int normalize(struct name_key *key)
{
	for (int i = 0; i < NAME_LEN; i++) {
		char c = key->name[i];
		if (c == 0)
			break;
		if (c == '[')
			return 0;
		if (c == '-')
			key->name[i] = '_';
	}
	return 1;
}

SEC("lsm/kernel_module_request")
int BPF_PROG(kmodd_request, char *kmod_name, int ret)
{
	struct config cfg = current_config();
	struct name_key key = {};
	__u32 zero = 0, verdict = V_PASS, rule = ~0U;

	if (ret != 0)
		return ret;
	count(STAT_REQUESTS);
	bpf_probe_read_kernel_str(key.name, sizeof(key.name), kmod_name);
	void *names = bpf_map_lookup_elem(&kmodd_names, &zero);
	if (names) {
		struct name_entry *e = normalize(&key) ? bpf_map_lookup_elem(names, &key) : 0;
		if (!e) {
			struct name_key any = {};  /* "": the rules for every other name */
			e = bpf_map_lookup_elem(names, &any);
		}
		if (e) {
			struct facts f = task_facts(bpf_get_current_task_btf());
			verdict = decide(e, &f, &rule);
		}
	}
	__u32 action = act(verdict, &cfg);
	if (action == A_DENIED)
		count(STAT_DENIED);
	else if (action == A_WOULD_DENY)
		count(STAT_WOULD_DENY);
	emit(K_REQUEST, action, verdict, rule, &cfg, kmod_name, 0, 0);
	return result(action);
}

SEC("lsm/kernel_read_file")
int BPF_PROG(kmodd_read_file, struct file *file, int id, _Bool contents, int ret)
{
	struct config cfg = current_config();
	__u32 zero = 0, verdict = V_PASS, rule = ~0U;

	if (ret != 0 || id != READING_MODULE)
		return ret;
	struct inode *inode = BPF_CORE_READ(file, f_inode);
	/* s_dev is the kernel's dev_t (major << 20 | minor); layout.py converts st_dev. */
	struct file_key key = {
		.dev = BPF_CORE_READ(inode, i_sb, s_dev),
		.ino = BPF_CORE_READ(inode, i_ino),
	};
	void *files = bpf_map_lookup_elem(&kmodd_files, &zero);
	if (files) {
		struct file_entry *e = bpf_map_lookup_elem(files, &key);
		if (e) {
			verdict = e->verdict;
			rule = e->rule;
		}
	}
	__u32 action = act(verdict, &cfg);
	if (action == A_DENIED)
		count(STAT_FILES_DENIED);
	const unsigned char *name = BPF_CORE_READ(file, f_path.dentry, d_name.name);
	emit(K_READ_FILE, action, verdict, rule, &cfg, (const char *)name, key.dev, key.ino);
	return result(action);
}

SEC("lsm/kernel_load_data")
int BPF_PROG(kmodd_load_data, int id, _Bool contents, int ret)
{
	struct config cfg = current_config();

	if (ret != 0 || id != LOADING_MODULE)
		return ret;
	__u32 action = act(cfg.load_data, &cfg);
	if (action == A_DENIED)
		count(STAT_LOAD_DATA_DENIED);
	emit(K_LOAD_DATA, action, cfg.load_data, ~0U, &cfg, 0, 0, 0);
	return result(action);
}
