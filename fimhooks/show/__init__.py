"""What is shown: the progress bar, the JSON log, plots, the report, the demo and the command line."""
