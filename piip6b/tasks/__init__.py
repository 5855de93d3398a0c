"""Tasks: Mask R-CNN on COCO and UperNet on ADE20K, their data and evaluation.

`build_task(cfg)` picks the task a config names (`base.py`, with the `Task` protocol the engine
relies on); `heads.py` holds the two rules every head follows (fp32 compute, ZeRO-3-safe init).
"""

from piip6b.tasks.base import Task, build_task

__all__ = ["Task", "build_task"]
