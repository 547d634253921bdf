"""The parts of the Hydra app ``lightning-imex-train`` (:mod:`lightning_imex.train`, its
entry point, composes, fits and tests with them): :mod:`.quiet` (output filters),
:mod:`.cli` (the command line, answered without Lightning where it can be), :mod:`.errors`
(one-line error text), :mod:`.checks` (config checks),
:mod:`.build` (datamodule, module, callbacks and Trainer from a config), :mod:`.threads`
(torch's intra-op threads), :mod:`.cores` (the CPU cores a process may use) and
:mod:`.run_dir` (a resumed run's folder)."""
