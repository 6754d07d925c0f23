"""lg-rotate: keeps LinuxGuard agents supplied with fresh enrolment tokens."""

__version__ = "0.1.0"
