"""lightning-imex-compare's recipes (one YAML file per paper claim; see lightning_imex.compare.recipe)."""
