"""Lightning callbacks."""

from lightning_cka.callbacks.cka_monitor import CKAMonitor

__all__ = ["CKAMonitor"]
