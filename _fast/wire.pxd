# Mirror of bpf/tapio.h; tests/unit/test_wire_btf.py checks its structs
# against the object's BTF.
from libc.stdint cimport uint32_t, uint64_t, int32_t, int64_t


cdef extern from "tapio.h" nogil:
    enum:
        TAPIO_COMM_LEN
        TAPIO_PATH_LEN
        TAPIO_DNAME_LEN
        TAPIO_DNAMES
        TAPIO_UID_LEN
        TAPIO_NAME_LEN
        TAPIO_CONTAINER_ID_LEN
        TAPIO_REC_ACCESS
        TAPIO_REC_SYSCALL
        TAPIO_F_BY_DEV
        TAPIO_F_BY_DIR
        TAPIO_STAT_MAX

    struct tapio_inode_key:
        uint32_t dev
        uint32_t gen
        uint64_t ino

    struct tapio_watch:
        uint32_t volume_id
        uint32_t file_id

    struct tapio_access:
        uint32_t kind
        uint32_t flags
        uint64_t ts_ns
        uint64_t cgroup_id
        uint32_t pid
        uint32_t tid
        tapio_inode_key key
        tapio_watch watch
        uint32_t op
        int32_t fd
        char comm[16]
        char path[256]

    struct tapio_access_ext:
        tapio_access base
        char dnames[4][64]

    struct tapio_syscall:
        uint32_t kind
        uint32_t nr
        uint64_t ts_ns
        uint64_t cgroup_id
        uint32_t pid
        uint32_t tid
        char comm[16]
