"""The ``jaxnet`` command: run directories, sweeps and plots. The library never imports it."""
