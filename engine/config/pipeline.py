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


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    runner: RunnerKind = RunnerKind.DIRECT
    # User transforms, "module:attr" or an entry-point name in group headrace.transforms,
    # applied in order after id remapping.
    plugins: tuple[str, ...] = ()
    # Extra Beam pipeline options passed verbatim, e.g. ["--flink_master=host:8081"].
    beam_options: tuple[str, ...] = ()
