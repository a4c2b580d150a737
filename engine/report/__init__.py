"""What a run reports: the run report, its rendering, checkpoint inspection and evaluation."""
