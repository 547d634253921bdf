"""The parts of the Hydra app ``lightning-imex-train`` (:mod:`lightning_imex.train`, its
entry point, composes, fits and tests with them): :mod:`.quiet` (output filters),
:mod:`.errors` (one-line error text), :mod:`.checks` (command-line and config checks),
:mod:`.build` (datamodule, module, callbacks and Trainer from a config), :mod:`.threads`
(torch's intra-op threads) and :mod:`.run_dir` (a resumed run's folder)."""
