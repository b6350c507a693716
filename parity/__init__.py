"""gpt-parity engine: checkpoint IO, subjects, comparison, goldens, gate, reports, CLI.

From a notebook:

    import parity
    df = parity.compare("path/to/ckpt", variants=["hf", "meg"], dtypes=["fp16"])
"""

__version__ = "0.1.0"


def __getattr__(name):  # `parity.compare` without importing torch at `import parity`
    if name == "compare":
        import importlib

        return importlib.import_module(".compare", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
