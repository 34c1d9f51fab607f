"""fastdd's version, in a module of its own: the modules that record it (sets, runs, the calibration's machine key)
read it here without importing the package's API, which imports them."""

__version__ = "0.1.0"
