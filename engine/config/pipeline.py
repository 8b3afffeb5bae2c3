"""Config section [pipeline]: which Beam runner runs the graph and which user transforms join it."""

from __future__ import annotations

import dataclasses
import enum

__all__ = ["RunnerKind", "PipelineConfig"]


class RunnerKind(enum.Enum):
    DIRECT = "DirectRunner"
    PRISM = "PrismRunner"
    FLINK = "FlinkRunner"
    SPARK = "SparkRunner"
    DATAFLOW = "DataflowRunner"
    PORTABLE = "PortableRunner"
    DASK = "DaskRunner"


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    runner: RunnerKind = RunnerKind.DIRECT
    # User transforms, "module:attr" or an entry-point name in group headrace.transforms,
    # applied in order after id remapping.
    plugins: tuple[str, ...] = ()
    # Extra Beam pipeline options passed verbatim, e.g. ["--flink_master=host:8081"].
    beam_options: tuple[str, ...] = ()
    # Pipeline processes on this host (serve; backfill from files): partition p goes to
    # worker p mod N (with [source] member "i/n": (p div n) mod N; see streams.assignment).
    workers: int = 1

    def __post_init__(self):
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        if self.workers > 1 and self.runner is RunnerKind.DASK:
            # each worker would be a Dask driver of its own share: the cluster's workers scale
            raise ValueError(f"workers = {self.workers} with runner = \"DaskRunner\": the Dask cluster's "
                             "workers do the scaling out; set workers = 1 (or leave it out)")
