"""The kernel side: the BPF object's loader and maps, the wire structs of
bpf/tapio.h, what this kernel supports (compat) and the verifier check."""
