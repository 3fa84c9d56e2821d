"""ncp: the NCPeH imaging connector (National Contact Point for eHealth, images and reports)."""

__version__ = "0.1.0"
