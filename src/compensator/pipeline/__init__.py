"""The sequential block pipeline and the statistics it collects."""

from compensator.pipeline.runner import PipelineReport, run_pipeline

__all__ = ["PipelineReport", "run_pipeline"]
