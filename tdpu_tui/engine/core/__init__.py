"""The run's frame: errors, events, configuration, artifact paths, the Stage contract, the pipeline, run status."""
