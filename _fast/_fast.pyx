# cython: language_level=3
"""libbpf loader, batched ring-buffer reader, kubelet path and mountinfo
parsers.

Pure-Python twins: tapio_node.kernel.wire (record decoder), tapio_node.kernel.records
(the records it hands out), tapio_node.kpath (path parser) and tapio_node.host
(mountinfo); TAPIO_PURE_PYTHON=1 makes the daemon use the parsers' twins.
"""
cimport cython
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int32_t
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memcmp, memset, strerror

cdef extern from "string.h" nogil:
    size_t strnlen(const char *s, size_t maxlen)
    void *memchr(const void *s, int c, size_t n)
from libc.errno cimport errno
from posix.mman cimport mmap, munmap, PROT_READ, PROT_WRITE, MAP_SHARED, MAP_FAILED
from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Malloc, PyMem_Free

cdef extern from "Python.h":
    object PyUnicode_DecodeFSDefaultAndSize(const char *s, Py_ssize_t size)

from libbpf cimport *
from wire cimport *

import os


cdef extern from "stdio.h" nogil:
    int vsnprintf(char *s, size_t n, const char *fmt, va_list ap)

cdef extern from "fcntl.h" nogil:
    enum:
        AT_FDCWD
        AT_SYMLINK_FOLLOW
    struct file_handle:
        unsigned int handle_bytes
        int handle_type
        unsigned char f_handle[0]
    int name_to_handle_at(int dirfd, const char *pathname, file_handle *handle, int *mount_id, int flags)

cdef extern from "sys/stat.h" nogil:
    struct stat:
        unsigned long st_dev
        unsigned long st_ino
        unsigned int st_mode
    int lstat(const char *path, stat *buf)

cdef extern from "sys/sysmacros.h" nogil:
    unsigned int major(unsigned long dev)
    unsigned int minor(unsigned long dev)


# -- libbpf log capture ----------------------------------------------------
# libbpf logs through one process-wide callback; keep the tail so an error
# can carry the verifier's reason.
cdef enum:
    LOG_SIZE = 16384
cdef char _log[LOG_SIZE]
cdef size_t _log_len = 0


cdef int _libbpf_print(libbpf_print_level level, const char *fmt, va_list args) noexcept nogil:
    global _log_len
    cdef char line[1024]
    cdef int n
    if level == LIBBPF_DEBUG:
        return 0
    n = vsnprintf(line, sizeof(line), fmt, args)
    if n <= 0:
        return 0
    if n >= <int>sizeof(line):
        n = sizeof(line) - 1
    if _log_len + n >= LOG_SIZE:
        # keep the newest half
        memcpy(_log, _log + LOG_SIZE // 2, LOG_SIZE // 2)
        _log_len = _log_len - LOG_SIZE // 2 if _log_len > LOG_SIZE // 2 else 0
    memcpy(_log + _log_len, line, n)
    _log_len += n
    return 0


libbpf_set_print(_libbpf_print)


def libbpf_log(bint clear=True):
    """The libbpf messages since the last call (the verifier log on failure)."""
    global _log_len
    text = (<bytes>_log[:_log_len]).decode("utf-8", "replace")
    if clear:
        _log_len = 0
    return text


class BpfError(OSError):
    """A libbpf call failed; .log holds libbpf's own explanation."""

    def __init__(self, errno_, what, log=""):
        super().__init__(errno_, f"{what}: {os.strerror(errno_)}")
        self.what = what
        self.log = log

    def __str__(self):
        text = super().__str__()
        tail = self.log.strip().splitlines()[-12:]
        return text + ("\n  " + "\n  ".join(tail) if tail else "")


cdef inline int _check(int rc, what) except -1:
    if rc < 0:
        raise BpfError(-rc, what, libbpf_log())
    return rc


# -- the BPF object --------------------------------------------------------
cdef class BpfObject:
    """One opened (then loaded and attached) BPF object file."""

    cdef bpf_object *obj
    cdef list links
    cdef dict link_names
    cdef dict _shared      # section -> (address, length) of its kernel map, mmapped
    cdef readonly bint loaded
    cdef readonly str path

    def __cinit__(self, str path):
        cdef bytes bpath = os.fsencode(path)
        cdef long err
        self.path = path
        self.links = []
        self.link_names = {}
        self._shared = {}
        libbpf_log()
        self.obj = bpf_object__open_file(bpath, NULL)
        err = libbpf_get_error(self.obj)
        if err or self.obj == NULL:
            self.obj = NULL
            raise BpfError(-err if err else 22, f"opening {path}", libbpf_log())

    def __dealloc__(self):
        self._close()

    cdef void _close(self):
        cdef size_t addr
        for addr in self.links:
            bpf_link__destroy(<bpf_link *>addr)
        self.links = []
        if self._shared:
            for addr, length in self._shared.values():
                munmap(<void *><size_t>addr, length)
            self._shared = {}
        if self.obj != NULL:
            bpf_object__close(self.obj)
            self.obj = NULL

    def close(self):
        """Detach every program and free the object (maps unpinned stay)."""
        self._close()
        self.loaded = False

    cdef bpf_object *_obj(self) except NULL:
        if self.obj == NULL:
            raise ValueError("BPF object is closed")
        return self.obj

    cdef bpf_program *_prog(self, str name) except NULL:
        cdef bpf_program *p = bpf_object__next_program(self._obj(), NULL)
        while p != NULL:
            if bpf_program__name(p).decode() == name:
                return p
            p = bpf_object__next_program(self.obj, p)
        raise KeyError(f"no BPF program named {name!r} in {self.path}")

    cdef bpf_map *_map(self, str name) except NULL:
        cdef bytes bname = name.encode()
        cdef bpf_map *m = bpf_object__find_map_by_name(self._obj(), bname)
        if m == NULL:
            raise KeyError(f"no BPF map named {name!r} in {self.path}")
        return m

    def programs(self):
        """Names of all programs, in object order."""
        cdef bpf_program *p = bpf_object__next_program(self._obj(), NULL)
        out = []
        while p != NULL:
            out.append(bpf_program__name(p).decode())
            p = bpf_object__next_program(self.obj, p)
        return out

    def autoload(self, str name):
        return bpf_program__autoload(self._prog(name))

    def set_autoload(self, str name, bint on):
        _check(bpf_program__set_autoload(self._prog(name), on), f"autoload {name}")

    def set_max_entries(self, str map_name, uint32_t n):
        _check(bpf_map__set_max_entries(self._map(map_name), n), f"sizing map {map_name}")

    cdef char *_var_ptr(self, str section, str var, uint32_t size) except NULL:
        """Address of a global in .rodata/.bss/.data, found through BTF."""
        cdef void *btf = bpf_object__btf(self._obj())
        cdef bpf_map *m = self._map(section)
        cdef size_t msize = 0
        cdef char *base
        cdef int sec_id
        cdef const btf_type *t
        cdef btf_var_secinfo *vs
        cdef int i
        if self.loaded and section in self._shared:
            # The kernel's own copy: libbpf < 1.5 maps it only for skeletons,
            # so bpf_map__initial_value() after load is a private buffer.
            base = <char *><size_t>self._shared[section][0]
            msize = bpf_map__value_size(m)
        else:
            base = <char *>bpf_map__initial_value(m, &msize)
        if btf == NULL or base == NULL:
            raise BpfError(95, f"no BTF or data for {section}")
        sec_id = btf__find_by_name_kind(btf, section.encode(), BTF_KIND_DATASEC)
        if sec_id < 0:
            raise KeyError(f"no BTF section {section}")
        t = btf__type_by_id(btf, sec_id)
        vs = btf_var_secinfos(t)
        for i in range(btf_vlen(t)):
            if btf__name_by_offset(btf, btf__type_by_id(btf, vs[i].type).name_off).decode() == var:
                if vs[i].size != size or vs[i].offset + size > msize:
                    raise ValueError(f"{section}.{var} is {vs[i].size} bytes, expected {size}")
                return base + vs[i].offset
        raise KeyError(f"no variable {var} in {section}")

    def set_u32(self, str section, str var, uint32_t value):
        """Set a u32 global: .rodata before load, .bss any time (mmapped)."""
        cdef char *p = self._var_ptr(section, var, 4)
        (<uint32_t *>p)[0] = value

    def get_u32(self, str section, str var):
        cdef char *p = self._var_ptr(section, var, 4)
        return (<uint32_t *>p)[0]

    def load(self):
        """Load every autoload program through the verifier."""
        libbpf_log()
        _check(bpf_object__load(self._obj()), f"loading {self.path}")
        self.loaded = True
        self._map_shared(".bss")

    cdef _map_shared(self, str section):
        """mmap a loaded global-data map MAP_SHARED, so user-space writes
        reach the programs (and reads see theirs)."""
        cdef bpf_map *m = self._map(section)
        cdef size_t page = <size_t>os.sysconf("SC_PAGE_SIZE")
        cdef size_t length = (bpf_map__value_size(m) + page - 1) // page * page
        cdef void *addr = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED, bpf_map__fd(m), 0)
        if addr == MAP_FAILED:
            raise BpfError(errno, f"mmap of {section}")
        self._shared[section] = (<size_t>addr, length)

    def attach(self, str name):
        cdef bpf_program *p = self._prog(name)
        cdef bpf_link *link
        cdef long err
        libbpf_log()
        with nogil:
            link = bpf_program__attach(p)
        err = libbpf_get_error(link)
        if err or link == NULL:
            raise BpfError(-err if err else 22, f"attaching {name}", libbpf_log())
        self.links.append(<size_t>link)
        self.link_names[name] = <size_t>link

    def attached(self):
        return list(self.link_names)

    def detach(self, str name):
        """Detach one attached program (its link is destroyed)."""
        cdef size_t addr = self.link_names.pop(name)
        self.links.remove(addr)
        bpf_link__destroy(<bpf_link *>addr)

    def pin_link(self, str name, str path):
        """Pin an attached program's link: it stays attached after this
        process exits, until the pin is removed."""
        _check(bpf_link__pin(<bpf_link *><size_t>self.link_names[name], os.fsencode(path)),
               f"pinning the link of {name} at {path}")

    def unpin_link(self, str name):
        _check(bpf_link__unpin(<bpf_link *><size_t>self.link_names[name]),
               f"unpinning the link of {name}")

    def recursion_misses(self, str name):
        """Times the kernel skipped this program because another BPF
        program or a BPF syscall held the CPU (bpf_prog_info, 5.12+;
        0 where the kernel does not count them)."""
        cdef bpf_prog_info info
        cdef uint32_t size = sizeof(info)
        memset(&info, 0, sizeof(info))
        if bpf_obj_get_info_by_fd(bpf_program__fd(self._prog(name)), &info, &size) != 0:
            return 0
        return info.recursion_misses

    def detach_all(self):
        cdef size_t addr
        for addr in self.links:
            bpf_link__destroy(<bpf_link *>addr)
        self.links = []
        self.link_names = {}

    def map_fd(self, str name):
        return _check(bpf_map__fd(self._map(name)), f"map {name} fd")

    def map_sizes(self, str name):
        cdef bpf_map *m = self._map(name)
        return bpf_map__key_size(m), bpf_map__value_size(m)

    def pin(self, str name, str path):
        _check(bpf_map__pin(self._map(name), os.fsencode(path)), f"pinning {name} at {path}")

    def unpin(self, str name, str path):
        _check(bpf_map__unpin(self._map(name), os.fsencode(path)), f"unpinning {name}")

    def map(self, str name):
        k, v = self.map_sizes(name)
        return Map(self.map_fd(name), name, k, v)


cdef class Map:
    """Typed-size access to one map fd; keys and values are bytes."""

    cdef readonly int fd
    cdef readonly str name
    cdef readonly uint32_t key_size
    cdef readonly uint32_t value_size

    def __cinit__(self, int fd, str name, uint32_t key_size, uint32_t value_size):
        self.fd = fd
        self.name = name
        self.key_size = key_size
        self.value_size = value_size

    cdef _sizes(self, bytes key, bytes value):
        if len(key) != self.key_size:
            raise ValueError(f"{self.name}: key is {len(key)} bytes, expected {self.key_size}")
        if value is not None and len(value) != self.value_size:
            raise ValueError(f"{self.name}: value is {len(value)} bytes, expected {self.value_size}")

    def update(self, bytes key, bytes value, uint64_t flags=0):
        cdef const char *k
        cdef const char *v
        cdef int rc
        self._sizes(key, value)
        k = key
        v = value
        with nogil:
            rc = bpf_map_update_elem(self.fd, k, v, flags)
        if rc < 0:
            raise BpfError(errno, f"updating map {self.name}")

    def delete(self, bytes key):
        """Remove a key; False when it was not there."""
        cdef const char *k
        cdef int rc
        self._sizes(key, None)
        k = key
        with nogil:
            rc = bpf_map_delete_elem(self.fd, k)
        if rc < 0:
            if errno == 2:
                return False
            raise BpfError(errno, f"deleting from map {self.name}")
        return True

    def lookup(self, bytes key):
        cdef bytes out = PyBytes_FromStringAndSize(NULL, self.value_size)
        cdef const char *k
        cdef int rc
        self._sizes(key, None)
        k = key
        rc = bpf_map_lookup_elem(self.fd, k, <char *>out)
        if rc < 0:
            if errno == 2:
                return None
            raise BpfError(errno, f"lookup in map {self.name}")
        return out

    def keys(self):
        cdef bytes prev
        cdef bytes cur = PyBytes_FromStringAndSize(NULL, self.key_size)
        cdef int rc = bpf_map_get_next_key(self.fd, NULL, <char *>cur)
        out = []
        while rc == 0:
            out.append(cur)
            prev = cur
            cur = PyBytes_FromStringAndSize(NULL, self.key_size)
            rc = bpf_map_get_next_key(self.fd, <char *>prev, <char *>cur)
        if errno != 2 and rc < 0:
            raise BpfError(errno, f"iterating map {self.name}")
        return out

    def percpu_sums(self, uint32_t nkeys):
        """Sum every per-CPU u64 slot of an array map's first nkeys keys."""
        cdef int ncpu = libbpf_num_possible_cpus()
        cdef uint64_t *vals = <uint64_t *>PyMem_Malloc(8 * ncpu)
        cdef uint32_t k
        cdef int c
        cdef uint64_t total
        out = []
        try:
            for k in range(nkeys):
                if bpf_map_lookup_elem(self.fd, &k, vals) < 0:
                    raise BpfError(errno, f"reading per-CPU map {self.name}")
                total = 0
                for c in range(ncpu):
                    total += vals[c]
                out.append(total)
        finally:
            PyMem_Free(vals)
        return out


# -- ring buffer: batch and fold in C, decode a batch at a time ------------
cdef size_t EXT_SIZE = sizeof(tapio_access_ext)

cdef struct Group:
    uint64_t hash
    uint64_t first_ts
    uint64_t last_ts
    uint32_t count
    uint32_t size


cdef struct Batch:
    char *recs            # gcap slots of EXT_SIZE bytes, one per group
    Group *groups
    int32_t *table        # open addressing: group index or -1
    uint32_t *slot_of     # group -> its table slot, to clear only those
    uint32_t *rec_group   # arrival order -> group
    uint64_t *rec_ts
    uint32_t cap          # records a batch takes
    uint32_t gcap         # distinct groups it takes (each becomes Python objects)
    uint32_t tmask
    uint32_t nrec
    uint32_t ngroups
    uint64_t bad
    int full


cdef inline uint64_t _fnv(uint64_t h, const char *p, size_t n) noexcept nogil:
    cdef size_t i
    for i in range(n):
        h = (h ^ <uint8_t>p[i]) * 1099511628211ULL
    return h


cdef inline uint64_t _mix(uint64_t h, uint64_t v) noexcept nogil:
    return (h ^ v) * 1099511628211ULL


cdef uint64_t _record_hash(const char *data, uint32_t kind) noexcept nogil:
    cdef const tapio_access *a
    cdef const tapio_syscall *s
    cdef uint64_t h = 14695981039346656037ULL
    if kind == TAPIO_REC_ACCESS:
        a = <const tapio_access *>data
        h = _mix(h, a.pid)
        h = _mix(h, a.cgroup_id)
        h = _mix(h, a.key.ino)
        h = _mix(h, (<uint64_t>a.key.dev << 32) | a.key.gen)
        h = _mix(h, (<uint64_t>a.watch.volume_id << 32) | a.watch.file_id)
        h = _mix(h, (<uint64_t>a.op << 32) | a.flags)
        h = _fnv(h, a.comm, TAPIO_COMM_LEN)
        h = _fnv(h, a.path, strnlen(a.path, TAPIO_PATH_LEN))
    else:
        s = <const tapio_syscall *>data
        h = _mix(h, s.pid)
        h = _mix(h, s.cgroup_id)
        h = _mix(h, s.nr)
        h = _fnv(h, s.comm, TAPIO_COMM_LEN)
    return h


cdef bint _same(const char *x, const char *y, uint32_t kind) noexcept nogil:
    cdef const tapio_access *a
    cdef const tapio_access *b
    cdef const tapio_syscall *s
    cdef const tapio_syscall *t
    if (<const uint32_t *>y)[0] != kind:
        return False
    if kind == TAPIO_REC_ACCESS:
        a = <const tapio_access *>x
        b = <const tapio_access *>y
        return (a.pid == b.pid and a.cgroup_id == b.cgroup_id
                and memcmp(&a.key, &b.key, sizeof(tapio_inode_key)) == 0
                and a.watch.volume_id == b.watch.volume_id
                and a.watch.file_id == b.watch.file_id
                and a.op == b.op and a.flags == b.flags
                and memcmp(a.comm, b.comm, TAPIO_COMM_LEN) == 0
                and strnlen(a.path, TAPIO_PATH_LEN) == strnlen(b.path, TAPIO_PATH_LEN)
                and memcmp(a.path, b.path, strnlen(a.path, TAPIO_PATH_LEN)) == 0)
    s = <const tapio_syscall *>x
    t = <const tapio_syscall *>y
    return (s.pid == t.pid and s.cgroup_id == t.cgroup_id and s.nr == t.nr
            and memcmp(s.comm, t.comm, TAPIO_COMM_LEN) == 0)


cdef int _add_record(Batch *b, const char *data, size_t size) noexcept nogil:
    """Fold one record into the batch; -ENOSPC once the batch is full."""
    cdef uint32_t kind, need, flags
    cdef uint64_t h, ts
    cdef uint32_t slot
    cdef int32_t g
    cdef bint foldable = True
    if size < 8:
        b.bad += 1
        return 0
    kind = (<const uint32_t *>data)[0]
    if kind == TAPIO_REC_ACCESS:
        need = sizeof(tapio_access)
        if size >= need:
            flags = (<const tapio_access *>data).flags
            if flags & (TAPIO_F_BY_DEV | TAPIO_F_BY_DIR):
                need = sizeof(tapio_access_ext)
                foldable = False
        ts = (<const tapio_access *>data).ts_ns
    elif kind == TAPIO_REC_SYSCALL:
        need = sizeof(tapio_syscall)
        ts = (<const tapio_syscall *>data).ts_ns if size >= need else 0
    else:
        b.bad += 1
        return 0
    if size < need:
        b.bad += 1
        return 0

    h = _record_hash(data, kind)
    slot = <uint32_t>h & b.tmask
    g = -1
    if foldable:
        while b.table[slot] >= 0:
            g = b.table[slot]
            if b.groups[g].hash == h and _same(data, b.recs + <size_t>g * EXT_SIZE, kind):
                break
            g = -1
            slot = (slot + 1) & b.tmask
    else:
        while b.table[slot] >= 0:
            slot = (slot + 1) & b.tmask
    if g < 0:
        g = b.ngroups
        b.ngroups += 1
        b.table[slot] = g
        b.slot_of[g] = slot
        memcpy(b.recs + <size_t>g * EXT_SIZE, data, need)
        b.groups[g].hash = h if foldable else 0
        b.groups[g].first_ts = ts
        b.groups[g].last_ts = ts
        b.groups[g].count = 0
        b.groups[g].size = need
    b.groups[g].count += 1
    if ts > b.groups[g].last_ts:
        b.groups[g].last_ts = ts
    b.rec_group[b.nrec] = g
    b.rec_ts[b.nrec] = ts
    b.nrec += 1
    if b.nrec >= b.cap or b.ngroups >= b.gcap:
        b.full = 1
        return -28
    return 0


cdef int _on_sample(void *ctx, void *data, size_t size) noexcept nogil:
    return _add_record(<Batch *>ctx, <const char *>data, size)


cdef inline str _cstr(const char *p, size_t n):
    return p[:strnlen(p, n)].decode("utf-8", "backslashreplace")


# The records take() hands out: named, read-only, built without going
# through Python calls. Their pure-Python twins are in tapio_node.kernel.records.
ACCESS_FIELDS = ("pid", "tid", "cgroup_id", "comm", "dev", "gen", "ino", "volume_id", "file_id",
                 "flags", "op", "path", "dnames", "count", "first_ts", "last_ts", "stamps")
SYSCALL_FIELDS = ("pid", "tid", "cgroup_id", "comm", "nr", "count", "first_ts", "last_ts", "stamps")


cdef class _Record:
    """What every folded group has: who, how many, when."""
    cdef readonly uint32_t pid
    cdef readonly uint32_t tid
    cdef readonly uint64_t cgroup_id
    cdef readonly str comm
    cdef readonly uint32_t count
    cdef readonly uint64_t first_ts
    cdef readonly uint64_t last_ts
    cdef list _stamps
    cdef bint _keep

    def __init__(self, *args, **kwargs):
        raise TypeError("records are made by RingReader.take() (tapio_node.kernel.records has "
                        "the constructible twins)")

    @property
    def stamps(self):
        """Each access's kernel time, in arrival order; None unless the
        reader keeps them. Built on demand for a group of one."""
        if self._stamps is not None:
            return self._stamps
        return [self.first_ts] if self._keep else None

    def __eq__(self, other):
        fields = self._fields
        if getattr(other, "kind", None) != self.kind or getattr(other, "_fields", None) != fields:
            return NotImplemented
        return all(getattr(self, f) == getattr(other, f) for f in fields)

    def __repr__(self):
        return "%s(%s)" % (type(self).__name__,
                           ", ".join("%s=%r" % (f, getattr(self, f)) for f in self._fields))


@cython.final
cdef class AccessRecord(_Record):
    """Identical opens of one watched file (kind REC_ACCESS)."""
    kind = TAPIO_REC_ACCESS
    _fields = ACCESS_FIELDS
    cdef readonly uint32_t dev
    cdef readonly uint32_t gen
    cdef readonly uint64_t ino
    cdef readonly uint32_t volume_id
    cdef readonly uint32_t file_id
    cdef readonly uint32_t flags
    cdef readonly uint32_t op
    cdef readonly str path
    cdef readonly tuple dnames


@cython.final
cdef class SyscallRecord(_Record):
    """Identical sampled syscalls of one pod process (kind REC_SYSCALL)."""
    kind = TAPIO_REC_SYSCALL
    _fields = SYSCALL_FIELDS
    cdef readonly uint32_t nr


cdef class RingReader:
    """Drains the `events` ring buffer into a preallocated batch.

    The libbpf callback only copies and folds records (identical accesses
    share one group with a count and their timestamps); Python objects are
    built once per group by take(), never per record in the callback."""

    cdef ring_buffer *rb
    cdef Batch b
    cdef readonly bint keep_timestamps

    def __cinit__(self, int map_fd, uint32_t capacity=8192, bint keep_timestamps=True,
                  uint32_t max_groups=1024):
        """capacity: records per batch (folded ones cost 12 bytes each);
        max_groups: distinct accesses per batch, which bounds the memory a
        flood of unfoldable records (ever-different paths) can take."""
        cdef uint32_t tsize = 1
        cdef uint32_t gcap = min(capacity, max_groups)
        while tsize < gcap * 2:
            tsize <<= 1
        memset(&self.b, 0, sizeof(Batch))
        self.b.cap = capacity
        self.b.gcap = gcap
        self.b.tmask = tsize - 1
        self.b.recs = <char *>malloc(<size_t>gcap * EXT_SIZE)
        self.b.groups = <Group *>calloc(gcap, sizeof(Group))
        self.b.table = <int32_t *>malloc(tsize * sizeof(int32_t))
        self.b.slot_of = <uint32_t *>malloc(gcap * sizeof(uint32_t))
        self.b.rec_group = <uint32_t *>malloc(capacity * sizeof(uint32_t))
        self.b.rec_ts = <uint64_t *>malloc(capacity * sizeof(uint64_t))
        if not (self.b.recs and self.b.groups and self.b.table and self.b.slot_of
                and self.b.rec_group and self.b.rec_ts):
            raise MemoryError()
        memset(self.b.table, 0xff, tsize * sizeof(int32_t))
        self.keep_timestamps = keep_timestamps
        self.rb = NULL
        if map_fd >= 0:
            libbpf_log()
            self.rb = ring_buffer__new(map_fd, _on_sample, &self.b, NULL)
            if self.rb == NULL:
                raise BpfError(errno or 22, "creating the ring buffer reader", libbpf_log())

    def __dealloc__(self):
        if self.rb != NULL:
            ring_buffer__free(self.rb)
        free(self.b.recs)
        free(self.b.groups)
        free(self.b.table)
        free(self.b.slot_of)
        free(self.b.rec_group)
        free(self.b.rec_ts)

    def fileno(self):
        """The epoll fd to wait on (readable when records are pending)."""
        return ring_buffer__epoll_fd(self.rb)

    @property
    def bad_records(self):
        return self.b.bad

    @property
    def full(self):
        return bool(self.b.full)

    @property
    def pending(self):
        return self.b.nrec

    def poll(self, int timeout_ms):
        """Wait up to timeout_ms and fold what arrived; returns records added."""
        cdef int rc
        cdef uint32_t before = self.b.nrec
        if self.b.full:
            return 0
        with nogil:
            rc = ring_buffer__poll(self.rb, timeout_ms)
        if rc < 0 and rc != -28 and rc != -4:
            raise BpfError(-rc, "polling the ring buffer")
        return self.b.nrec - before

    def consume(self):
        """Fold every record already there, without waiting."""
        cdef int rc
        cdef uint32_t before = self.b.nrec
        if self.b.full:
            return 0
        with nogil:
            rc = ring_buffer__consume(self.rb)
        if rc < 0 and rc != -28 and rc != -4:
            raise BpfError(-rc, "consuming the ring buffer")
        return self.b.nrec - before

    def feed(self, records):
        """Fold raw records (bytes) as the kernel callback would; for tests."""
        cdef bytes r
        added = 0
        for r in records:
            if self.b.full:
                break
            _add_record(&self.b, r, len(r))
            added += 1
        return added

    def take(self):
        """The folded batch as AccessRecord/SyscallRecord, then reset."""
        cdef Batch *b = &self.b
        cdef uint32_t g, i
        cdef const tapio_access *a
        cdef const tapio_access_ext *x
        cdef const tapio_syscall *s
        cdef const char *rec
        cdef list out = []
        cdef list stamps = None
        cdef list lst
        cdef _Record r
        cdef AccessRecord ar
        cdef SyscallRecord sr
        cdef bint keep = self.keep_timestamps
        if keep and b.nrec:
            # Lists only for groups of more than one: the rest build theirs
            # if asked (the unfoldable flood is all groups of one).
            stamps = [None] * b.ngroups
            for i in range(b.nrec):
                g = b.rec_group[i]
                if b.groups[g].count > 1:
                    lst = <list>stamps[g]
                    if lst is None:
                        lst = []
                        stamps[g] = lst
                    lst.append(b.rec_ts[i])
        for g in range(b.ngroups):
            rec = b.recs + <size_t>g * EXT_SIZE
            if (<const uint32_t *>rec)[0] == TAPIO_REC_ACCESS:
                a = <const tapio_access *>rec
                ar = AccessRecord.__new__(AccessRecord)
                ar.pid, ar.tid, ar.cgroup_id = a.pid, a.tid, a.cgroup_id
                ar.comm = _cstr(a.comm, TAPIO_COMM_LEN)
                ar.dev, ar.gen, ar.ino = a.key.dev, a.key.gen, a.key.ino
                ar.volume_id, ar.file_id = a.watch.volume_id, a.watch.file_id
                ar.flags, ar.op = a.flags, a.op
                ar.path = _cstr(a.path, TAPIO_PATH_LEN)
                if b.groups[g].size == sizeof(tapio_access_ext):
                    x = <const tapio_access_ext *>rec
                    ar.dnames = tuple([_cstr(x.dnames[i], TAPIO_DNAME_LEN) for i in range(TAPIO_DNAMES)])
                r = ar
            else:
                s = <const tapio_syscall *>rec
                sr = SyscallRecord.__new__(SyscallRecord)
                sr.pid, sr.tid, sr.cgroup_id = s.pid, s.tid, s.cgroup_id
                sr.comm = _cstr(s.comm, TAPIO_COMM_LEN)
                sr.nr = s.nr
                r = sr
            r.count = b.groups[g].count
            r.first_ts = b.groups[g].first_ts
            r.last_ts = b.groups[g].last_ts
            r._keep = keep
            if stamps is not None:
                r._stamps = <list>stamps[g]
            out.append(r)
        for g in range(b.ngroups):
            b.table[b.slot_of[g]] = -1
        b.nrec = 0
        b.ngroups = 0
        b.full = 0
        return out


# -- inode identity of files on disk ---------------------------------------
def stat_inode_key(path):
    """(kernel s_dev, i_generation or None, i_ino, st_mode) of a path, not
    following a final symlink. The generation comes from the file handle
    (ext4: [ino, gen]; tmpfs: [gen, ino_lo, ino_hi]); None when the handle
    layout is not one we can read."""
    cdef bytes bpath = os.fsencode(path)
    cdef const char *cpath = bpath
    cdef stat st
    cdef uint64_t buf[24]  # struct file_handle + 128 bytes of handle
    cdef file_handle *fh = <file_handle *>buf
    cdef int mount_id = 0
    cdef int rc
    cdef uint32_t *w
    cdef uint32_t nwords
    cdef uint64_t ino
    with nogil:
        rc = lstat(cpath, &st)
    if rc < 0:
        raise OSError(errno, strerror(errno).decode(), path)
    kdev = (major(st.st_dev) << 20) | minor(st.st_dev)  # as tapio_node.host.kernel_dev
    ino = st.st_ino
    fh.handle_bytes = 128
    with nogil:
        rc = name_to_handle_at(AT_FDCWD, cpath, fh, &mount_id, 0)
    gen = None
    if rc == 0:
        w = <uint32_t *>fh.f_handle
        nwords = fh.handle_bytes // 4
        if nwords >= 2 and w[0] == <uint32_t>ino:
            gen = w[1]
        elif nwords >= 3 and w[1] == <uint32_t>ino and w[2] == <uint32_t>(ino >> 32):
            gen = w[0]
    return kdev, gen, ino, st.st_mode


# -- kubelet volume paths --------------------------------------------------
def parse_volume_path(str path, str pods_root):
    """'<pods_root>/<uid>/volumes/<plugin>/<volume>[/<key...>]' ->
    (uid, plugin, volume, key or ''), or None when it is not one."""
    cdef Py_ssize_t n = len(pods_root)
    cdef Py_ssize_t i, j, k, m
    while n > 1 and pods_root[n - 1] == '/':
        n -= 1
    if len(path) <= n + 1 or path[n] != '/' or not path.startswith(pods_root[:n]):
        return None
    i = n + 1
    j = path.find('/', i)
    if j < 0 or j == i:
        return None
    if path[j + 1:j + 9] != 'volumes/':
        return None
    k = j + 9
    m = path.find('/', k)
    if m < 0 or m == k:
        return None
    plugin = path[k:m]
    vstart = m + 1
    vend = path.find('/', vstart)
    if vend < 0:
        vend = len(path)
        key = ''
    else:
        key = path[vend + 1:].rstrip('/')
    if vend == vstart:
        return None
    return path[i:j], plugin, path[vstart:vend], key


# -- /proc/self/mountinfo --------------------------------------------------
cdef inline bint _mi_num(const char *s, Py_ssize_t n, uint64_t *out) noexcept nogil:
    """1 to 10 ASCII digits (the twin's rule), so the value fits easily."""
    cdef uint64_t v = 0
    cdef Py_ssize_t i
    if n < 1 or n > 10:
        return False
    for i in range(n):
        if s[i] < 48 or s[i] > 57:
            return False
        v = v * 10 + <uint64_t>(s[i] - 48)
    out[0] = v
    return True


cdef inline bint _mi_oct(char c, char hi) noexcept nogil:
    return 48 <= c <= hi


cdef object _mi_field(char *s, Py_ssize_t n):
    """Undo the kernel's \\ooo escapes (space, tab, newline, backslash) in
    place, then decode as os.fsdecode does."""
    cdef Py_ssize_t i = 0, o = 0
    while i < n:
        if (s[i] == 92 and i + 3 < n and _mi_oct(s[i + 1], 51)
                and _mi_oct(s[i + 2], 55) and _mi_oct(s[i + 3], 55)):
            s[o] = <char>((s[i + 1] - 48) * 64 + (s[i + 2] - 48) * 8 + (s[i + 3] - 48))
            i += 4
        else:
            s[o] = s[i]
            i += 1
        o += 1
    return PyUnicode_DecodeFSDefaultAndSize(s, o)


cdef inline Py_ssize_t _mi_next(const char *s, Py_ssize_t n, Py_ssize_t *pos,
                                Py_ssize_t *start) noexcept nogil:
    """The field at *pos (split on single spaces, empty fields kept):
    its length, or -1 past the line's last field."""
    cdef Py_ssize_t p = pos[0], q
    if p > n:
        return -1
    q = p
    while q < n and s[q] != 32:
        q += 1
    start[0] = p
    pos[0] = q + 1
    return q - p


cdef object _mi_line(char *s, Py_ssize_t n):
    cdef Py_ssize_t pos = 0, fs[6], fl[6], tail_s[3], tail_l[3], a, l, k, c
    cdef uint64_t mid, pid, maj, mn
    cdef list opt = []
    for k in range(6):
        fl[k] = _mi_next(s, n, &pos, &fs[k])
        if fl[k] < 0:
            return None
    while True:
        l = _mi_next(s, n, &pos, &a)
        if l < 0:
            return None
        if l == 1 and s[a] == 45:  # "-" ends the optional fields
            break
        opt.append((a, l))
    for k in range(3):
        tail_l[k] = _mi_next(s, n, &pos, &tail_s[k])
        if tail_l[k] < 0:
            return None
    c = 0
    while c < fl[2] and s[fs[2] + c] != 58:
        c += 1
    if (c == fl[2] or not _mi_num(s + fs[0], fl[0], &mid) or not _mi_num(s + fs[1], fl[1], &pid)
            or not _mi_num(s + fs[2], c, &maj)
            or not _mi_num(s + fs[2] + c + 1, fl[2] - c - 1, &mn)):
        return None
    return (mid, pid, (maj << 20) | mn,
            _mi_field(s + fs[3], fl[3]), _mi_field(s + fs[4], fl[4]), _mi_field(s + fs[5], fl[5]),
            tuple([_mi_field(s + <Py_ssize_t>o[0], <Py_ssize_t>o[1]) for o in opt]),
            _mi_field(s + tail_s[0], tail_l[0]), _mi_field(s + tail_s[1], tail_l[1]),
            _mi_field(s + tail_s[2], tail_l[2]))


def parse_mountinfo(bytes data):
    """/proc/<pid>/mountinfo text -> one tuple per well-formed line:
    (mount_id, parent_id, dev, root, mount_point, options, optional fields,
    fstype, source, super_options), dev as the kernel encodes it
    (major << 20 | minor), strings unescaped. Lines that do not parse are
    left out, as tapio_node.host._py_parse_mountinfo does."""
    cdef Py_ssize_t n = len(data), pos = 0, end
    cdef char *buf = <char *>PyMem_Malloc(n + 1)
    cdef const char *nl
    cdef list out = []
    if buf == NULL:
        raise MemoryError()
    memcpy(buf, <const char *>data, n)
    try:
        while pos < n:
            nl = <const char *>memchr(buf + pos, 10, n - pos)
            end = n if nl == NULL else nl - buf
            rec = _mi_line(buf + pos, end - pos)
            if rec is not None:
                out.append(rec)
            pos = end + 1
    finally:
        PyMem_Free(buf)
    return out
