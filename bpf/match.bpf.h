/* SPDX-License-Identifier: GPL-2.0 */
/* Is this open file one we watch? Included twice by tapio.bpf.c:
 * MATCH_FN names the function and LD(p, field) (LD2: two levels) reads a
 * kernel field, either directly (a pointer typed by bpf_rdonly_cast, 6.2+)
 * or through bpf_probe_read_kernel with CO-RE (older kernels). One body,
 * so every kernel runs the same rules.
 *
 * Returns 1 and fills key, watch, flags and inode for a watched file. */

static __always_inline int MATCH_FN(struct file *file, struct tapio_inode_key *key,
				    struct tapio_watch *watch, __u32 *flags,
				    struct inode **inode_out)
{
	struct inode *inode = LD(file, f_inode);
	struct tapio_watch *hit;
	struct tapio_dev *dev;

	key->dev = LD2(inode, i_sb, s_dev);
	/* Most opens are on devices that hold no watched volume. */
	if (!maybe_dev(key->dev))
		return 0;
	dev = bpf_map_lookup_elem(&watched_devs, &key->dev);
	if (!dev)
		return 0;
	if ((LD(inode, i_mode) & S_IFMT) != S_IFREG)
		return 0;
	key->ino = LD(inode, i_ino);
	if (dev->flags & TAPIO_DEV_USE_GEN)
		key->gen = LD(inode, i_generation);
	*inode_out = inode;

	hit = maybe_ino(key->ino) ? bpf_map_lookup_elem(&watched_inodes, key) : NULL;
	if (hit) {
		*watch = *hit;
		return 1;
	}
	if (dev->flags & TAPIO_DEV_WHOLE) {
		/* A new file on a per-volume tmpfs that user space has not
		 * indexed yet (atomic-writer update in flight). */
		watch->volume_id = dev->volume_id;
		*flags |= TAPIO_F_BY_DEV;
		return 1;
	}
	if (dev->flags & TAPIO_DEV_WALK) {
		struct tapio_inode_key dkey = { .dev = key->dev };
		struct dentry *d = LD(file, f_path.dentry);
		struct dentry *parent;
		struct inode *pi;
		__u32 *vol;

		/* The inode filter keeps this cheap for the shared disk's other
		 * files; a hash lookup only on a filter hit. */
#pragma unroll
		for (int i = 0; i < TAPIO_DNAMES; i++) {
			parent = LD(d, d_parent);
			if (!parent || parent == d)
				break;
			pi = LD(parent, d_inode);
			if (!pi)
				break;
			dkey.ino = LD(pi, i_ino);
			if (maybe_ino(dkey.ino)) {
				if (dev->flags & TAPIO_DEV_USE_GEN)
					dkey.gen = LD(pi, i_generation);
				vol = bpf_map_lookup_elem(&watched_dirs, &dkey);
				if (vol) {
					watch->volume_id = *vol;
					*flags |= TAPIO_F_BY_DIR;
					return 1;
				}
			}
			d = parent;
		}
	}
	return 0;
}
