"""gpt-parity: does this checkpoint, run the fast way, still compute the same function?

Folders by role: `checkpoints/` (what goes in), `subjects/` (the implementations under test),
`engine/` (metrics, budgets, verdicts, comparison), `goldens/`, `reports/`, `commands/` (gate,
search, detection); `cli.py` defines every command's arguments.

From a notebook:

    import parity
    df = parity.compare("path/to/ckpt", variants=["hf", "meg"], dtypes=["fp16"])
    g = parity.generate_compare("path/to/ckpt", dtype="fp16", max_new_tokens=16)
    g.verdict, g.result.figures, g.steps        # greedy decoding against the reference's
"""

__version__ = "0.1.0"


def __getattr__(name):  # `parity.compare` without importing torch at `import parity`
    if name == "compare":
        from parity.api import compare

        return compare
    if name == "generate_compare":
        from parity.api import generate_compare

        return generate_compare
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
