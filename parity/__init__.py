"""gpt-parity engine: checkpoint IO, subjects, comparison, goldens, gate, reports, CLI."""

__version__ = "0.1.0"
