"""The seed project's place for the schedule: ``GradualWarmupScheduler`` is defined in ``module/run/schedule.py``."""
from module.run.schedule import GradualWarmupScheduler

__all__ = ["GradualWarmupScheduler"]
