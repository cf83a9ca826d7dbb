// SPDX-License-Identifier: GPL-2.0
/* tapio-node kernel side: report every successful open of a file that
 * belongs to a watched ConfigMap/Secret/projected volume.
 *
 * The file is identified by its inode (dev, generation, ino) after the open
 * succeeded, never by the path string the process passed: containers open
 * bind-mounted, symlinked, relative paths (README.md, "How it works"). */
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_tracing.h>
#include "tapio.h"
#include "compat.bpf.h"

char LICENSE[] SEC("license") = "GPL";

#define S_IFMT 00170000
#define S_IFREG 0100000
#define EACCES 13

/* 1 in N syscalls of pod processes becomes a pod_syscall record (0: off). */
const volatile __u32 sampling_rate = 0;
/* The daemon's own reads (e.g. a service account's namespace file) are
 * not accesses to report. */
const volatile __u32 self_tgid = 0;
/* Read the path from the stashed enter argument instead of pt_regs. */
const volatile __u32 use_enter_stash = 0;

/* Adaptive wake-ups, set live by user space through the mmapped .bss:
 * 0 wakes the reader whenever it has caught up (lowest latency); N > 0
 * wakes it only once N bytes are pending (batching under load; the reader
 * then polls with a short timeout). */
__u32 wakeup_bytes = 0;
/* Which overflow_counts generation the kernel writes (modulo
 * TAPIO_OVERFLOW_GENS); user space advances it after draining the oldest. */
__u32 overflow_gen = 0;

/* Enforcement (TAPIO_POLICY_*), set live by user space. */
__u32 policy_mode = 0;

/* Keep the record types in the object's BTF, so the user-space mirror
 * can be checked against it (tests/unit/test_wire_btf.py). */
struct tapio_access_ext *btf_anchor_access __attribute__((unused));
struct tapio_syscall *btf_anchor_syscall __attribute__((unused));

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4 << 20);  /* resized from ring_buffer_size */
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct tapio_inode_key);
	__type(value, struct tapio_watch);
} watched_inodes SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TAPIO_DEV_FILTER_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} dev_filter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, TAPIO_INO_FILTER_SLOTS);
	__type(key, __u32);
	__type(value, __u32);
} ino_filter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, struct tapio_dev);
} watched_devs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct tapio_inode_key);
	__type(value, __u32);
} watched_dirs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u64);
	__type(value, struct tapio_pod_info);
} pod_info_map SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 131072);
	__type(key, __u32);
	__type(value, __u64);
} container_pids SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, TAPIO_STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct tapio_overflow_key);
	__type(value, __u64);
} overflow_counts SEC(".maps");

/* Enforcement: the owner of each volume and whether it is protected;
 * written by user space before the volume's files enter watched_inodes. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, struct tapio_volume_policy);
} volume_policy SEC(".maps");

/* Host cgroup leaf names (systemd units) allowed to open any volume. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 256);
	__type(key, char[TAPIO_NAME_LEN]);
	__type(value, __u32);
} policy_host_allow SEC(".maps");

/* Pods (by UID) allowed to open other pods' volumes. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct tapio_uid);
	__type(value, __u32);
} policy_pod_allow SEC(".maps");

/* cgroup id -> who its processes are. A cgroup's path never changes
 * (cgroup v2 refuses renames) and ids are never reused, so an entry never
 * goes stale; LRU bounds it. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, struct tapio_opener);
} opener_cache SEC(".maps");

struct policy_scratch {
	char name[TAPIO_CGROUP_NAME_LEN];
	struct tapio_opener opener;
};

/* Per-CPU room for a cgroup name: a map value takes bounded variable
 * offsets on every kernel, the stack not before 5.11. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct policy_scratch);
} policy_scratch SEC(".maps");

/* Fallback only (use_enter_stash): thread -> filename pointer. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u64);
	__type(value, __u64);
} pending_opens SEC(".maps");

/* Array lookups are inlined by the verifier: a few instructions. */
static __always_inline bool maybe_dev(__u32 dev)
{
	__u32 slot = dev % TAPIO_DEV_FILTER_SLOTS;
	__u32 *n = bpf_map_lookup_elem(&dev_filter, &slot);

	return n && *n;
}

static __always_inline bool maybe_ino(__u64 ino)
{
	__u32 slot = ino % TAPIO_INO_FILTER_SLOTS;
	__u32 *n = bpf_map_lookup_elem(&ino_filter, &slot);

	return n && *n;
}

static __always_inline void count(__u32 idx)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &idx);

	if (v)
		*v += 1;
}

/* The ring buffer is full: keep the access as a count. */
static __always_inline void count_overflow(__u64 id, struct tapio_watch *watch, __u32 op)
{
	struct tapio_overflow_key ok = {
		.cgroup_id = bpf_get_current_cgroup_id(),
		.pid = id >> 32,
		.volume_id = watch->volume_id,
		.file_id = watch->file_id,
		.op = op,
		.gen = overflow_gen % TAPIO_OVERFLOW_GENS,
	};
	__u64 one = 1, *n;

	count(TAPIO_STAT_DROPS);
	n = bpf_map_lookup_elem(&overflow_counts, &ok);
	if (!n) {
		if (!bpf_map_update_elem(&overflow_counts, &ok, &one, BPF_NOEXIST))
			return;
		n = bpf_map_lookup_elem(&overflow_counts, &ok);
		if (!n) {
			count(TAPIO_STAT_LOST);
			return;
		}
	}
	__sync_fetch_and_add(n, 1);
}

static __always_inline __u64 rb_flags(__u64 size)
{
	__u32 threshold = wakeup_bytes;
	__u64 avail;

	if (!threshold)
		return 0;
	/* Under load wake the reader once, when this record crosses the
	 * threshold: each wake-up is an irq_work (a self-IPI, a VM exit on a
	 * guest), so forcing one per record above it costs more than the
	 * record. The daemon sets a threshold the ring never reaches and
	 * drains on a timer instead. */
	avail = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA);
	if (avail >= threshold && avail < threshold + size + 8)
		return BPF_RB_FORCE_WAKEUP;
	return BPF_RB_NO_WAKEUP;
}

/* The file behind a just-returned fd of the current task. */
static __always_inline struct file *fd_to_file(long fd)
{
	struct file **fds;
	struct file *file = NULL;
	unsigned int max_fds;

	/* No RCU read lock here: a racing close() can leave a stale slot, so
	 * the caller counts a NULL as TAPIO_STAT_FD_RACE. */
	if (HAVE_TASK_BTF) {
		struct fdtable *fdt = bpf_get_current_task_btf()->files->fdt;

		max_fds = fdt->max_fds;
		fds = fdt->fd;
	} else {
		struct task_struct *task = (struct task_struct *)bpf_get_current_task();
		struct fdtable *fdt = BPF_CORE_READ(task, files, fdt);

		max_fds = BPF_CORE_READ(fdt, max_fds);
		fds = BPF_CORE_READ(fdt, fd);
	}
	if ((unsigned long)fd >= max_fds)
		return NULL;
	bpf_probe_read_kernel(&file, sizeof(file), &fds[fd]);
	return file;
}

static __always_inline const char *user_path(int arg)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct pt_regs *regs;
	__u64 *stashed;

	if (arg < 0)
		return NULL;
	if (use_enter_stash || !HAVE_TASK_PT_REGS) {
		stashed = bpf_map_lookup_elem(&pending_opens, &id);
		return stashed ? (const char *)*stashed : NULL;
	}
	/* The saved user registers still hold the syscall arguments at exit,
	 * so unwatched opens pay for no enter program at all. */
	regs = (struct pt_regs *)bpf_task_pt_regs(bpf_get_current_task_btf());
	return arg == 0 ? (const char *)PT_REGS_PARM1_CORE_SYSCALL(regs)
			: (const char *)PT_REGS_PARM2_CORE_SYSCALL(regs);
}

/* The file's name and its parents' (TAPIO_F_DNAME_TRUNC if one did not fit). */
static __always_inline __u32 fill_dnames(struct tapio_access_ext *ext,
					 struct dentry *d)
{
	const unsigned char *name;
	__u32 flags = 0;

#pragma unroll
	for (int i = 0; i < TAPIO_DNAMES; i++) {
		name = BPF_CORE_READ(d, d_name.name);
		if (bpf_probe_read_kernel_str(ext->dnames[i], TAPIO_DNAME_LEN, name) == TAPIO_DNAME_LEN)
			flags |= TAPIO_F_DNAME_TRUNC;
		d = BPF_CORE_READ(d, d_parent);
	}
	return flags;
}

#define MATCH_FN match_direct
#define LD(p, field) ((p)->field)
#define LD2(p, a, b) ((p)->a->b)
#include "match.bpf.h"
#undef MATCH_FN
#undef LD
#undef LD2
#define MATCH_FN match_probed
#define LD(p, field) BPF_CORE_READ(p, field)
#define LD2(p, a, b) BPF_CORE_READ(p, a, b)
#include "match.bpf.h"
#undef MATCH_FN
#undef LD
#undef LD2

/* Reserve, fill and submit one access record for a matched file. */
static __always_inline void report_access(struct file *file, struct tapio_inode_key *key,
					  struct tapio_watch *watch, __u32 flags,
					  struct inode *inode, __u64 id, __u32 op,
					  const char *upath, long fd)
{
	struct tapio_access *rec;
	struct tapio_access_ext *ext = NULL;
	long n;

	count(TAPIO_STAT_HITS);
	if (flags & (TAPIO_F_BY_DEV | TAPIO_F_BY_DIR)) {
		ext = bpf_ringbuf_reserve(&events, sizeof(*ext), 0);
		rec = ext ? &ext->base : NULL;
	} else {
		rec = bpf_ringbuf_reserve(&events, sizeof(*rec), 0);
	}
	if (!rec) {
		count_overflow(id, watch, op | (flags & TAPIO_F_POLICY_MASK) << 2);
		return;
	}

	if (BPF_CORE_READ(inode, __i_nlink) == 0)
		flags |= TAPIO_F_UNLINKED;
	rec->kind = TAPIO_REC_ACCESS;
	rec->ts_ns = bpf_ktime_get_ns();
	rec->cgroup_id = bpf_get_current_cgroup_id();
	rec->pid = id >> 32;
	rec->tid = (__u32)id;
	rec->key = *key;
	rec->watch = *watch;
	rec->op = op;
	rec->fd = fd;
	bpf_get_current_comm(rec->comm, sizeof(rec->comm));
	rec->path[0] = 0;
	if (upath) {
		n = bpf_probe_read_user_str(rec->path, sizeof(rec->path), upath);
		if (n < 0)
			flags |= TAPIO_F_PATH_FAULT;
		else if (n == sizeof(rec->path))
			flags |= TAPIO_F_PATH_TRUNC;
	}
	if (ext)
		flags |= fill_dnames(ext, BPF_CORE_READ(file, f_path.dentry));
	rec->flags = flags;
	if (ext) {
		bpf_ringbuf_submit(ext, rb_flags(sizeof(*ext)));
	} else {
		bpf_ringbuf_submit(rec, rb_flags(sizeof(*rec)));
	}
}

/* -- enforcement -------------------------------------------------------
 * A pod's protected volume may be opened only by that pod's processes,
 * pods in policy_pod_allow and host units in policy_host_allow. Decided
 * here from the opener's cgroup path and the volume's owner, so a pod
 * that started a moment ago is never denied for user space lagging. */

static __always_inline char name_at(struct policy_scratch *s, long i)
{
	return s->name[i & (TAPIO_CGROUP_NAME_LEN - 1)];
}

/* Does the name end, at `end`, in "-pod" + a ulen-character UID? */
static __always_inline bool systemd_pod_at(struct policy_scratch *s, long end, long ulen)
{
	long p = end - ulen - 4;

	return p >= 0 && name_at(s, p) == '-' && name_at(s, p + 1) == 'p' &&
	       name_at(s, p + 2) == 'o' && name_at(s, p + 3) == 'd';
}

/* The pod UID in one cgroup name into out ('-' separated), or false:
 * "pod<uid>" (cgroupfs driver) or "...-pod<uid>.slice" (systemd driver,
 * which escapes '-' as '_'). */
static __always_inline bool pod_uid_of(struct policy_scratch *s, long len,
				       struct tapio_uid *out)
{
	long start, ulen, end = len - 6;

	if ((len == 39 || len == 35) && name_at(s, 0) == 'p' && name_at(s, 1) == 'o' &&
	    name_at(s, 2) == 'd') {
		start = 3;
		ulen = len - 3;
	} else if (len > 6 && name_at(s, end) == '.' && name_at(s, end + 1) == 's' &&
		   name_at(s, end + 2) == 'l' && name_at(s, end + 3) == 'i' &&
		   name_at(s, end + 4) == 'c' && name_at(s, end + 5) == 'e') {
		if (systemd_pod_at(s, end, 36))
			ulen = 36;
		else if (systemd_pod_at(s, end, 32))
			ulen = 32;
		else
			return false;
		start = end - ulen;
	} else {
		return false;
	}
#pragma unroll
	for (int i = 0; i < 36; i++) {
		char c;

		if (i >= ulen)
			break;
		c = name_at(s, start + i);
		if (c == '_')
			c = '-';
		if (!((c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || c == '-'))
			return false;
		out->s[i] = c;
	}
	return true;
}

/* Who the current task is, from its cgroup v2 path, cached per cgroup. */
static __always_inline struct tapio_opener *current_opener(void)
{
	struct task_struct *task = (struct task_struct *)bpf_get_current_task();
	struct kernfs_node *kn = BPF_CORE_READ(task, cgroups, dfl_cgrp, kn);
	__u64 cgid = BPF_CORE_READ(kn, id);
	struct tapio_opener *o = bpf_map_lookup_elem(&opener_cache, &cgid);
	struct tapio_uid found;
	struct policy_scratch *s;
	__u32 zero = 0;
	long n;

	if (o)
		return o;
	s = bpf_map_lookup_elem(&policy_scratch, &zero);
	if (!s)
		return NULL;
	__builtin_memset(&s->opener, 0, sizeof(s->opener));
	n = bpf_probe_read_kernel_str(s->opener.leaf, sizeof(s->opener.leaf), BPF_CORE_READ(kn, name));
	if (n == sizeof(s->opener.leaf))
		s->opener.leaf[0] = 0;  /* cut short: it matches no allowed name */
	/* Walk to the root and keep the topmost pod: a tenant may name a
	 * cgroup below its own container after another pod, never above. */
	for (int level = 0; level < TAPIO_CGROUP_DEPTH && kn; level++) {
		n = bpf_probe_read_kernel_str(s->name, sizeof(s->name), BPF_CORE_READ(kn, name));
		__builtin_memset(&found, 0, sizeof(found));
		if (n > 1 && pod_uid_of(s, n - 1, &found)) {
			s->opener.pod = found;
			s->opener.flags = TAPIO_OPENER_POD;
		}
		kn = kn_parent(kn);
	}
	if (kn)
		s->opener.flags = TAPIO_OPENER_UNKNOWN;  /* deeper than we walk */
	bpf_map_update_elem(&opener_cache, &cgid, &s->opener, BPF_ANY);
	return &s->opener;
}

static __always_inline bool same_uid(const struct tapio_uid *a, const struct tapio_uid *b)
{
	const __u64 *x = (const __u64 *)a->s, *y = (const __u64 *)b->s;

	return x[0] == y[0] && x[1] == y[1] && x[2] == y[2] && x[3] == y[3] && x[4] == y[4];
}

/* The TAPIO_F_POLICY_* flag for a watched open by the current task. */
static __always_inline __u32 policy_verdict(struct tapio_watch *watch, bool can_deny)
{
	__u32 mode = policy_mode;
	struct tapio_volume_policy *vp;
	struct tapio_opener *o;

	if (mode == TAPIO_POLICY_OFF)
		return 0;
	vp = bpf_map_lookup_elem(&volume_policy, &watch->volume_id);
	if (!vp || !(vp->flags & TAPIO_VOL_PROTECTED))
		return TAPIO_F_POLICY_ALLOWED;
	o = current_opener();
	if (o && (o->flags & TAPIO_OPENER_POD)) {
		if (same_uid(&o->pod, &vp->owner) || bpf_map_lookup_elem(&policy_pod_allow, &o->pod))
			return TAPIO_F_POLICY_ALLOWED;
	} else if (o && !(o->flags & TAPIO_OPENER_UNKNOWN)) {
		if (bpf_map_lookup_elem(&policy_host_allow, o->leaf))
			return TAPIO_F_POLICY_ALLOWED;
	}
	return mode == TAPIO_POLICY_ENFORCE && can_deny ? TAPIO_F_POLICY_DENIED
							: TAPIO_F_POLICY_WOULD_DENY;
}

static __always_inline int on_open_exit(long ret, __u32 op, int path_arg)
{
	struct tapio_inode_key key = {};
	struct tapio_watch watch = {};
	struct inode *inode = NULL;
	struct file *file;
	__u32 flags = 0;
	__u64 id;
	int hit;

	if (ret < 0)
		return 0;
	file = fd_to_file(ret);
	if (!file) {
		count(TAPIO_STAT_FD_RACE);
		return 0;
	}
	if (HAVE_RDONLY_CAST)
		hit = match_direct(bpf_rdonly_cast(file, bpf_core_type_id_kernel(struct file)),
				   &key, &watch, &flags, &inode);
	else
		hit = match_probed(file, &key, &watch, &flags, &inode);
	if (!hit)
		return 0;

	id = bpf_get_current_pid_tgid();
	if ((__u32)(id >> 32) == self_tgid)
		return 0;
	/* The open has succeeded: a verdict here can only be reported. */
	flags |= policy_verdict(&watch, false);
	report_access(file, &key, &watch, flags, inode, id, op, user_path(path_arg), ret);
	return 0;
}

static __always_inline int stash_path(const char *path)
{
	__u64 id = bpf_get_current_pid_tgid();
	__u64 ptr = (__u64)path;

	bpf_map_update_elem(&pending_opens, &id, &ptr, BPF_ANY);
	return 0;
}

static __always_inline void drop_stash(void)
{
	__u64 id = bpf_get_current_pid_tgid();

	if (use_enter_stash)
		bpf_map_delete_elem(&pending_opens, &id);
}

/* The main program: openat(2) is what libc's open() calls. */
SEC("tracepoint/syscalls/sys_exit_openat")
int trace_config_access(struct trace_event_raw_sys_exit *ctx)
{
	on_open_exit(ctx->ret, TAPIO_OP_OPENAT, 1);
	drop_stash();
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_open")
int trace_config_access_open(struct trace_event_raw_sys_exit *ctx)
{
	on_open_exit(ctx->ret, TAPIO_OP_OPEN, 0);
	drop_stash();
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_openat2")
int trace_config_access_openat2(struct trace_event_raw_sys_exit *ctx)
{
	on_open_exit(ctx->ret, TAPIO_OP_OPENAT2, 1);
	drop_stash();
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_creat")
int trace_config_access_creat(struct trace_event_raw_sys_exit *ctx)
{
	on_open_exit(ctx->ret, TAPIO_OP_CREAT, 0);
	drop_stash();
	return 0;
}

SEC("tracepoint/syscalls/sys_exit_open_by_handle_at")
int trace_config_access_by_handle(struct trace_event_raw_sys_exit *ctx)
{
	on_open_exit(ctx->ret, TAPIO_OP_OPEN_BY_HANDLE, -1);
	return 0;
}

/* io_uring IORING_OP_OPENAT/OPENAT2 make no open syscall: catch their
 * completion instead. The fd is installed in the submitter's table, which
 * io-wq workers share, so the same fd -> inode resolution applies. The
 * filename is already freed at completion: no path for these.
 *
 * The classic tracepoint, not tp_btf: its record has kept the same fields
 * since the request pointer was added, while the tp_btf arguments changed
 * in 6.0 and again in 6.4. Where the record has no request (older kernels)
 * the opcode is unknown and user space keeps this program off. */
SEC("tracepoint/io_uring/io_uring_complete")
int trace_config_access_uring(struct trace_event_raw_io_uring_complete *ctx)
{
	struct io_kiocb *req;
	__u8 opcode;

	if (!bpf_core_field_exists(ctx->req))
		return 0;
	req = ctx->req;
	opcode = BPF_CORE_READ(req, opcode);
	if (opcode != IORING_OP_OPENAT && opcode != IORING_OP_OPENAT2)
		return 0;
	/* A direct descriptor (fixed file slot) is not an fd in the table;
	 * the io_open command sits at the start of the request. */
	if (HAVE_URING_FILE_SLOT && BPF_CORE_READ((struct io_open *)req, file_slot))
		return 0;
	on_open_exit(ctx->res,
		     opcode == IORING_OP_OPENAT ? TAPIO_OP_URING_OPENAT : TAPIO_OP_URING_OPENAT2, -1);
	return 0;
}

/* The security_file_open backends (lsm, fentry; tapio_node/kernel/backends.py).
 * One hook sees every open of a file whatever made it (any open syscall,
 * io_uring, open_by_handle_at, exec), after the path walk and the
 * permission checks, with the struct file in hand: no fd lookup, no race
 * with close, and no syscall tracepoint, so other syscalls pay nothing. */

/* x86_64 syscall numbers (the object is built for x86 only). */
#define NR_OPEN 2
#define NR_CREAT 85
#define NR_EXECVE 59
#define NR_OPEN_BY_HANDLE_AT 304
#define NR_EXECVEAT 322
#define NR_IO_URING_ENTER 426
#define NR_OPENAT 257
#define NR_OPENAT2 437
#define PF_IO_WORKER 0x00000010
#define PF_KTHREAD 0x00200000

/* Set by user space for an instant after attaching a hook: its own opens
 * then count in TAPIO_STAT_PROBE. That proves the hook runs: a BPF LSM
 * program attaches even where bpf is not in lsm=, and then never runs. */
__u32 probe_tgid = 0;

/* Which syscall opened the file, from the task's saved user registers, and
 * the path argument it passed (NULL if it has none). */
static __always_inline __u32 opener_op(const char **upath)
{
	struct task_struct *task = bpf_get_current_task_btf();
	struct pt_regs *regs;
	long nr;

	*upath = NULL;
	if (task->flags & PF_IO_WORKER)
		return TAPIO_OP_URING;  /* io-wq worker or SQPOLL thread */
	if ((task->flags & PF_KTHREAD) || !HAVE_TASK_PT_REGS)
		return TAPIO_OP_OTHER;
	regs = (struct pt_regs *)bpf_task_pt_regs(task);
	nr = BPF_CORE_READ(regs, orig_ax);
	switch (nr) {
	case NR_OPENAT:
		*upath = (const char *)PT_REGS_PARM2_CORE_SYSCALL(regs);
		return TAPIO_OP_OPENAT;
	case NR_OPEN:
		*upath = (const char *)PT_REGS_PARM1_CORE_SYSCALL(regs);
		return TAPIO_OP_OPEN;
	case NR_OPENAT2:
		*upath = (const char *)PT_REGS_PARM2_CORE_SYSCALL(regs);
		return TAPIO_OP_OPENAT2;
	case NR_CREAT:
		*upath = (const char *)PT_REGS_PARM1_CORE_SYSCALL(regs);
		return TAPIO_OP_CREAT;
	case NR_OPEN_BY_HANDLE_AT:
		return TAPIO_OP_OPEN_BY_HANDLE;
	case NR_EXECVE:
		*upath = (const char *)PT_REGS_PARM1_CORE_SYSCALL(regs);
		return TAPIO_OP_EXEC;
	case NR_EXECVEAT:
		*upath = (const char *)PT_REGS_PARM2_CORE_SYSCALL(regs);
		return TAPIO_OP_EXEC;
	case NR_IO_URING_ENTER:
		return TAPIO_OP_URING;  /* completed inline at submission */
	}
	return TAPIO_OP_OTHER;
}

/* Returns -EACCES to deny (only where can_deny: the LSM program). */
static __always_inline int on_file_open(struct file *file, bool can_deny)
{
	struct tapio_inode_key key = {};
	struct tapio_watch watch = {};
	struct inode *inode = NULL;
	const char *upath;
	__u32 flags = 0, op, verdict;
	__u64 id;

	if (probe_tgid && (__u32)(bpf_get_current_pid_tgid() >> 32) == probe_tgid)
		count(TAPIO_STAT_PROBE);
	/* A hook argument is a BTF pointer: fields load directly on every kernel. */
	if (!match_direct(file, &key, &watch, &flags, &inode))
		return 0;
	id = bpf_get_current_pid_tgid();
	if ((__u32)(id >> 32) == self_tgid)
		return 0;
	verdict = policy_verdict(&watch, can_deny);
	op = opener_op(&upath);
	/* The fd is not allocated to the file yet at this point. */
	report_access(file, &key, &watch, flags | verdict, inode, id, op, upath, -1);
	return verdict == TAPIO_F_POLICY_DENIED ? -EACCES : 0;
}

/* ret: the verdict of the BPF LSM programs before this one. Other LSMs
 * (AppArmor, SELinux) run first when bpf is last in lsm=, and a denial
 * there stops the chain: a denied open never reaches this program. */
SEC("lsm/file_open")
int BPF_PROG(lsm_config_access, struct file *file, int ret)
{
	if (ret)
		return ret;
	return on_file_open(file, true);
}

/* fexit, not fentry: it sees security_file_open's verdict, the whole LSM
 * chain's (and, before 6.8, fanotify's permission event's), so an open an
 * LSM denies is never reported. fentry would run before any of them. */
SEC("fexit/security_file_open")
int BPF_PROG(fexit_config_access, struct file *file, int ret)
{
	if (!ret)
		on_file_open(file, false);
	return 0;
}

/* Enter programs: only loaded when bpf_task_pt_regs is unavailable. */
SEC("tracepoint/syscalls/sys_enter_openat")
int stash_openat(struct trace_event_raw_sys_enter *ctx)
{
	return stash_path((const char *)ctx->args[1]);
}

SEC("tracepoint/syscalls/sys_enter_open")
int stash_open(struct trace_event_raw_sys_enter *ctx)
{
	return stash_path((const char *)ctx->args[0]);
}

SEC("tracepoint/syscalls/sys_enter_openat2")
int stash_openat2(struct trace_event_raw_sys_enter *ctx)
{
	return stash_path((const char *)ctx->args[1]);
}

SEC("tracepoint/syscalls/sys_enter_creat")
int stash_creat(struct trace_event_raw_sys_enter *ctx)
{
	return stash_path((const char *)ctx->args[0]);
}

/* Pod correlation for other collectors: keep container_pids (pid ->
 * cgroup id) for processes in known pod cgroups, from process lifecycle
 * tracepoints rather than by sampling syscalls. */
static __always_inline __u64 task_cgroup_id(struct task_struct *task)
{
	return BPF_CORE_READ(task, cgroups, dfl_cgrp, kn, id);
}

static __always_inline void track_pid(__u32 pid, __u64 cgid)
{
	if (bpf_map_lookup_elem(&pod_info_map, &cgid))
		bpf_map_update_elem(&container_pids, &pid, &cgid, BPF_ANY);
	else
		bpf_map_delete_elem(&container_pids, &pid);
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(track_fork, struct task_struct *parent, struct task_struct *child)
{
	if (child->pid != child->tgid)
		return 0;
	track_pid(child->tgid, task_cgroup_id(child));
	return 0;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(track_exec, struct task_struct *p, pid_t old_pid,
	     struct linux_binprm *bprm)
{
	track_pid(p->tgid, task_cgroup_id(p));
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(track_exit, struct task_struct *p)
{
	__u32 pid = p->tgid;

	if (p->pid == p->tgid)
		bpf_map_delete_elem(&container_pids, &pid);
	return 0;
}

SEC("tp_btf/cgroup_attach_task")
int BPF_PROG(track_attach, struct cgroup *dst, const char *path,
	     struct task_struct *task, bool threadgroup)
{
	/* Only the cgroup v2 hierarchy; runtimes move a process into its
	 * container cgroup after fork. */
	if (BPF_CORE_READ(dst, root, hierarchy_id) != 0)
		return 0;
	track_pid(task->tgid, BPF_CORE_READ(dst, kn, id));
	return 0;
}

/* pod_syscall records: sample 1 in sampling_rate syscalls of
 * processes in known pod cgroups. Autoload is off when the rate is 0. */
SEC("tracepoint/raw_syscalls/sys_enter")
int trace_pod_syscalls(struct trace_event_raw_sys_enter *ctx)
{
	struct tapio_syscall *rec;
	__u64 cgid, id;

	if (!sampling_rate || bpf_get_prandom_u32() % sampling_rate)
		return 0;
	cgid = bpf_get_current_cgroup_id();
	if (!bpf_map_lookup_elem(&pod_info_map, &cgid))
		return 0;
	rec = bpf_ringbuf_reserve(&events, sizeof(*rec), 0);
	if (!rec) {
		count(TAPIO_STAT_SYSCALL_DROPS);
		return 0;
	}
	id = bpf_get_current_pid_tgid();
	rec->kind = TAPIO_REC_SYSCALL;
	rec->nr = ctx->id;
	rec->ts_ns = bpf_ktime_get_ns();
	rec->cgroup_id = cgid;
	rec->pid = id >> 32;
	rec->tid = (__u32)id;
	bpf_get_current_comm(rec->comm, sizeof(rec->comm));
	bpf_ringbuf_submit(rec, rb_flags(sizeof(*rec)));
	return 0;
}
