"""Private XLA:CPU kernels and compile options used by jaxnet's layers and compiled programs."""
