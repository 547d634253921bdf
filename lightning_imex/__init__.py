"""lightning_imex: IMEX Runge-Kutta Adam optimizers, model EMA and Lightning glue.

Importing this package (or ``lightning_imex.optim``) pulls in torch only; the
Lightning and Hydra layers live in their own subpackages.
"""

__version__ = "0.1.0"
