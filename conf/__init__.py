# The Hydra configs, installed as the package data of `lightning_imex.conf` so that
# `lightning-imex-train` finds them after a plain `pip install .` too.
