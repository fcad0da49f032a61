"""The sequential block pipeline and the statistics it collects."""
