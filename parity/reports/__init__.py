"""Report runs and their rendering (summary.md, index.html, divergence.csv, run.json)."""
