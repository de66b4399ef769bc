"""Reports of a run (JSON, Markdown, plot) and the checks that turn them into an exit code."""
