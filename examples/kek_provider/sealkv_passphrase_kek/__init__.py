"""An example sealkv KEK provider: the KEK is derived from a passphrase file with scrypt."""
__version__ = "0.1.0"
