"""dedt-ray: Ray-distributed orchestrator for data-efficient diffusion training."""

__version__ = "0.1.0"
