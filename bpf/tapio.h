/* SPDX-License-Identifier: (LGPL-2.1 OR BSD-2-Clause) */
/* Wire structs shared by tapio.bpf.c and user space (tapio_node/kernel/wire.py
 * and _fast/wire.pxd mirror this file; tests/unit/test_wire_btf.py checks
 * both mirrors against it and the compiled object's BTF). */
#ifndef __TAPIO_H
#define __TAPIO_H

#define TAPIO_COMM_LEN 16
#define TAPIO_PATH_LEN 256
#define TAPIO_NAME_LEN 64
#define TAPIO_DNAME_LEN 64
#define TAPIO_DNAMES 4
#define TAPIO_UID_LEN 40
#define TAPIO_CONTAINER_ID_LEN 72

/* record kinds */
#define TAPIO_REC_ACCESS 1
#define TAPIO_REC_SYSCALL 2

/* access record flags */
#define TAPIO_F_PATH_TRUNC 0x1  /* the path did not fit */
#define TAPIO_F_PATH_FAULT 0x2  /* the user buffer could not be read */
#define TAPIO_F_BY_DEV 0x4      /* matched by device (per-volume tmpfs) */
#define TAPIO_F_BY_DIR 0x8      /* matched by a watched parent directory */
#define TAPIO_F_UNLINKED 0x10   /* the inode has no name left (subPath) */
#define TAPIO_F_DNAME_TRUNC 0x20 /* a dnames[] name was cut at TAPIO_DNAME_LEN - 1 */
/* The enforcement verdict (none of them while policy_mode is off). */
#define TAPIO_F_POLICY_ALLOWED 0x40
#define TAPIO_F_POLICY_WOULD_DENY 0x80  /* audit mode, or a backend that cannot deny */
#define TAPIO_F_POLICY_DENIED 0x100     /* the open failed with EACCES */
#define TAPIO_F_POLICY_MASK 0x1c0

/* which syscall opened the file */
#define TAPIO_OP_OPENAT 0
#define TAPIO_OP_OPEN 1
#define TAPIO_OP_OPENAT2 2
#define TAPIO_OP_CREAT 3
#define TAPIO_OP_OPEN_BY_HANDLE 4
#define TAPIO_OP_URING_OPENAT 5
#define TAPIO_OP_URING_OPENAT2 6
/* The security_file_open backends (lsm, fentry) name the opener from the
 * task, not from a per-syscall tracepoint: */
#define TAPIO_OP_EXEC 7         /* the binary (or its interpreter) of an execve */
#define TAPIO_OP_URING 8        /* an io_uring open (worker or inline) */
#define TAPIO_OP_OTHER 9        /* any other syscall, or a kernel thread */

/* watched_devs flags */
#define TAPIO_DEV_USE_GEN 0x1   /* the key carries i_generation */
#define TAPIO_DEV_WHOLE 0x2     /* every file on the device is one volume */
#define TAPIO_DEV_WALK 0x4      /* walk parents to a watched volume dir */

/* Filters in front of the hash maps: an unwatched open is rejected by an
 * inlined array read instead of a hash lookup. Slots count the watched
 * devices / inodes (files and volume dirs) that fall in them. */
#define TAPIO_DEV_FILTER_SLOTS 1024
#define TAPIO_INO_FILTER_SLOTS 65536

/* policy_mode, set by user space through the mmapped .bss */
#define TAPIO_POLICY_OFF 0
#define TAPIO_POLICY_AUDIT 1
#define TAPIO_POLICY_ENFORCE 2

/* volume_policy flags */
#define TAPIO_VOL_PROTECTED 0x1   /* its kind is in enforcement.kinds */

/* opener_cache flags */
#define TAPIO_OPENER_POD 0x1      /* pod_uid holds the opener's pod */
#define TAPIO_OPENER_UNKNOWN 0x2  /* its cgroup is nested deeper than we walk */

/* How far up a cgroup's ancestors the opener's pod is looked for. */
#define TAPIO_CGROUP_DEPTH 16
#define TAPIO_CGROUP_NAME_LEN 128

/* counters (index into the per-CPU stats map) */
#define TAPIO_STAT_DROPS 0      /* ring buffer reservation failed */
#define TAPIO_STAT_HITS 1       /* watched opens seen */
#define TAPIO_STAT_FD_RACE 2    /* fd gone before it could be read */
#define TAPIO_STAT_SYSCALL_DROPS 3
#define TAPIO_STAT_LOST 4       /* not even counted: overflow map full */
#define TAPIO_STAT_PROBE 5      /* opens by probe_tgid: proves a hook runs */
#define TAPIO_STAT_MAX 6

struct tapio_inode_key {
	__u32 dev;      /* kernel s_dev: major << 20 | minor */
	__u32 gen;      /* i_generation, 0 unless TAPIO_DEV_USE_GEN */
	__u64 ino;
};

struct tapio_watch {
	__u32 volume_id;
	__u32 file_id;  /* 0: resolve the key from the record's dnames */
};

struct tapio_dev {
	__u32 flags;
	__u32 volume_id;
};

/* When the ring buffer is full an access is still counted, without its
 * path and timestamp, under this key. Keys carry a generation
 * (overflow_gen % TAPIO_OVERFLOW_GENS); user space drains the oldest one,
 * unwritten for TAPIO_OVERFLOW_GENS - 1 ticks, then makes it the current
 * one: a program preempted between choosing its key and counting (syscall
 * tracepoints are preemptible on newer kernels) still counts into a
 * generation nobody drains or deletes yet. */
#define TAPIO_OVERFLOW_GENS 8
/* An overflow key's op holds the TAPIO_OP_* in its low byte and the
 * verdict above it: op | (flags & TAPIO_F_POLICY_MASK) << 2. */
#define TAPIO_OVERFLOW_OP_MASK 0xff
struct tapio_overflow_key {
	__u64 cgroup_id;
	__u32 pid;
	__u32 volume_id;
	__u32 file_id;
	__u16 op;
	__u16 gen;
};

/* A pod UID as text, '-' separated, NUL padded: 36 characters (32 for a
 * static pod's config hash). */
struct tapio_uid {
	char s[TAPIO_UID_LEN];
};

struct tapio_volume_policy {
	struct tapio_uid owner;   /* the pod whose volume this is */
	__u32 flags;              /* TAPIO_VOL_* */
};

/* Who opens, from the opener's cgroup: its pod, or its leaf name (a
 * systemd unit on the host). */
struct tapio_opener {
	struct tapio_uid pod;
	__u32 flags;              /* TAPIO_OPENER_* */
	char leaf[TAPIO_NAME_LEN];
};

struct tapio_pod_info {
	char pod_uid[TAPIO_UID_LEN];
	char namespace[TAPIO_NAME_LEN];
	char pod_name[TAPIO_NAME_LEN * 4];
	char container_id[TAPIO_CONTAINER_ID_LEN];
	__s64 created_at;
	__u32 qos;
	__u32 flags;
};

struct tapio_access {
	__u32 kind;     /* TAPIO_REC_ACCESS */
	__u32 flags;
	__u64 ts_ns;    /* CLOCK_MONOTONIC */
	__u64 cgroup_id;
	__u32 pid;
	__u32 tid;
	struct tapio_inode_key key;
	struct tapio_watch watch;
	__u32 op;
	__s32 fd;
	char comm[TAPIO_COMM_LEN];
	char path[TAPIO_PATH_LEN];
};

/* A fallback match (TAPIO_F_BY_DEV / TAPIO_F_BY_DIR) has no file_id yet:
 * it carries the file's name and up to three parents, nearest first, so
 * user space can name the key without a second look at the disk. */
struct tapio_access_ext {
	struct tapio_access base;
	char dnames[TAPIO_DNAMES][TAPIO_DNAME_LEN];
};

struct tapio_syscall {
	__u32 kind;     /* TAPIO_REC_SYSCALL */
	__u32 nr;
	__u64 ts_ns;
	__u64 cgroup_id;
	__u32 pid;
	__u32 tid;
	char comm[TAPIO_COMM_LEN];
};

#endif /* __TAPIO_H */
