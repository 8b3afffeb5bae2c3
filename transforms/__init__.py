"""Pure event -> Arrow functions: decode, filter, project, id hashing and id remapping
(Numba kernels), plus thin Beam wrappers. No LMDB, no trainer imports."""

__all__ = ["elements", "decode", "filters", "hashing", "mappers", "process", "beam_steps"]
