"""deskpod: the software of a personal AI supercomputer."""
__version__ = "0.1.0"
