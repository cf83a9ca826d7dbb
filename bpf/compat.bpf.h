/* SPDX-License-Identifier: GPL-2.0 */
/* Kernel differences, in one place, the way libbpf-tools handles them:
 * a __weak kfunc tested with bpf_ksym_exists(), helpers tested with a CO-RE
 * enum-value check, fields tested with bpf_core_field_exists(). Each test
 * is a constant after relocation, so the verifier never walks the branch a
 * kernel cannot run and the object loads everywhere.
 *
 * The user-space mirror, which reports what is off and what it costs, is
 * tapio_node/kernel/compat.py. Oldest kernel: 5.10 (Debian 11). */
#ifndef __TAPIO_COMPAT_BPF_H
#define __TAPIO_COMPAT_BPF_H

/* libbpf < 1.2 (Debian 12 ships 1.1) has no bpf_ksym_exists(). */
#ifndef bpf_ksym_exists
#define bpf_ksym_exists(sym) ({						\
	_Static_assert(!__builtin_constant_p(!!sym),			\
		       #sym " should be marked as __weak");		\
	!!sym;								\
})
#endif

/* 6.2: cast a pointer read with bpf_probe_read_kernel so its fields can be
 * loaded directly (inlined fault-safe loads, no helper call per field). */
#ifndef TAPIO_NO_KFUNCS
extern void *bpf_rdonly_cast(const void *obj, __u32 btf_id) __ksym __weak;
#define HAVE_RDONLY_CAST bpf_ksym_exists(bpf_rdonly_cast)
#else
/* Built a second time without kfunc externs (tapio-nokfunc.bpf.o) for
 * kernels that lack them: libbpf resolves even a __weak kfunc by walking
 * module BTFs, which needs CAP_SYS_ADMIN the unit does not grant. */
#define HAVE_RDONLY_CAST 0
#define bpf_rdonly_cast(obj, id) ((void *)(obj))
#endif

/* 5.11: the current task as a BTF pointer (direct field loads). */
#define HAVE_TASK_BTF \
	bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_get_current_task_btf)

/* 5.15: the task's saved user registers, which still hold the syscall
 * arguments at exit; without it the path is stashed at syscall entry. */
#define HAVE_TASK_PT_REGS \
	bpf_core_enum_value_exists(enum bpf_func_id, BPF_FUNC_task_pt_regs)

/* 5.15: io_uring direct descriptors (a fixed-file slot, not an fd). */
#define HAVE_URING_FILE_SLOT bpf_core_field_exists(struct io_open, file_slot)

/* 6.15 renamed kernfs_node.parent to __parent (it became RCU-managed). */
struct kernfs_node___old {
	struct kernfs_node *parent;
} __attribute__((preserve_access_index));

static __always_inline struct kernfs_node *kn_parent(struct kernfs_node *kn)
{
	if (bpf_core_field_exists(struct kernfs_node, __parent))
		return BPF_CORE_READ(kn, __parent);
	return BPF_CORE_READ((struct kernfs_node___old *)kn, parent);
}

#endif /* __TAPIO_COMPAT_BPF_H */
