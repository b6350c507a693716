"""Golden activation files: the parity-golden/1 format, the committed store, foreign goldens."""
