# Only what _fast.pyx uses, one extern block per header (libbpf 1.1).
from libc.stdint cimport uint32_t, uint64_t, int32_t


cdef extern from "stdarg.h":
    ctypedef struct va_list:
        pass


cdef extern from "bpf/libbpf.h" nogil:
    struct bpf_object
    struct bpf_program
    struct bpf_map
    struct bpf_link
    struct ring_buffer

    enum libbpf_print_level:
        LIBBPF_WARN
        LIBBPF_INFO
        LIBBPF_DEBUG

    ctypedef int (*libbpf_print_fn_t)(libbpf_print_level level, const char *fmt, va_list args) noexcept
    libbpf_print_fn_t libbpf_set_print(libbpf_print_fn_t fn)

    bpf_object *bpf_object__open_file(const char *path, const void *opts)
    int bpf_object__load(bpf_object *obj)
    void bpf_object__close(bpf_object *obj)
    bpf_program *bpf_object__next_program(const bpf_object *obj, bpf_program *prog)
    bpf_map *bpf_object__find_map_by_name(const bpf_object *obj, const char *name)
    bpf_map *bpf_object__next_map(const bpf_object *obj, const bpf_map *map)
    void *bpf_object__btf(const bpf_object *obj)

    const char *bpf_program__name(const bpf_program *prog)
    int bpf_program__set_autoload(bpf_program *prog, bint autoload)
    int bpf_program__fd(const bpf_program *prog)
    bint bpf_program__autoload(const bpf_program *prog)
    bpf_link *bpf_program__attach(const bpf_program *prog)
    int bpf_link__destroy(bpf_link *link)
    int bpf_link__pin(bpf_link *link, const char *path)
    int bpf_link__unpin(bpf_link *link)

    int bpf_map__fd(const bpf_map *map)
    const char *bpf_map__name(const bpf_map *map)
    int bpf_map__set_max_entries(bpf_map *map, uint32_t max_entries)
    uint32_t bpf_map__key_size(const bpf_map *map)
    uint32_t bpf_map__value_size(const bpf_map *map)
    const void *bpf_map__initial_value(bpf_map *map, size_t *psize)
    int bpf_map__pin(bpf_map *map, const char *path)
    int bpf_map__unpin(bpf_map *map, const char *path)

    ctypedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size) noexcept nogil
    ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb, void *ctx, const void *opts)
    void ring_buffer__free(ring_buffer *rb)
    int ring_buffer__poll(ring_buffer *rb, int timeout_ms)
    int ring_buffer__consume(ring_buffer *rb)
    int ring_buffer__epoll_fd(const ring_buffer *rb)

    long libbpf_get_error(const void *ptr)
    int libbpf_num_possible_cpus()


cdef extern from "bpf/bpf.h" nogil:
    int bpf_map_update_elem(int fd, const void *key, const void *value, uint64_t flags)
    int bpf_map_lookup_elem(int fd, const void *key, void *value)
    int bpf_map_delete_elem(int fd, const void *key)
    int bpf_map_get_next_key(int fd, const void *key, void *next_key)
    int bpf_obj_get_info_by_fd(int bpf_fd, void *info, uint32_t *info_len)


cdef extern from "linux/bpf.h" nogil:
    struct bpf_prog_info:
        uint64_t recursion_misses


cdef extern from "bpf/btf.h" nogil:
    struct btf_type:
        uint32_t name_off
        uint32_t info
        uint32_t type
    struct btf_var_secinfo:
        uint32_t type
        uint32_t offset
        uint32_t size
    int btf__find_by_name_kind(const void *btf, const char *name, uint32_t kind)
    const btf_type *btf__type_by_id(const void *btf, uint32_t id)
    const char *btf__name_by_offset(const void *btf, uint32_t offset)
    unsigned short btf_vlen(const btf_type *t)
    btf_var_secinfo *btf_var_secinfos(const btf_type *t)
    unsigned int BTF_KIND_DATASEC
