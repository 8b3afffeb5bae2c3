"""Pure event -> Arrow functions: decode, filter, project, id hashing and id remapping
(Numba kernels), plus thin Beam wrappers. No LMDB, no trainer imports."""

__all__ = [
    "elements",
    "decode",
    "decode_json",
    "decode_json_fast",
    "decode_tsv",
    "decode_csv",
    "expressions",
    "derive",
    "filters",
    "hashing",
    "mappers",
    "hash_kernels",
    "learned_hash",
    "hash_fit",
    "sketch",
    "process",
    "beam_steps",
    "plugin_api",
    "config",
    "errors",
]
