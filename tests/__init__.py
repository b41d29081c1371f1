"""mgpt4's tests. A regular package, so `tests.*` is this folder even where another distribution
installs a top-level `tests` package into site-packages (latex2sympy2, an lmms-eval dependency, does)."""
