"""The engine: what a collected step records, and how its per-input sums are computed."""
