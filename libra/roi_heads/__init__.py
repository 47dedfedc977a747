"""RoI heads: everything that works on pooled regions of interest.

- :class:`MultiLevelRoIExtractor`: RoIAlign of each RoI on the pyramid level of its size;
- box heads (:class:`Shared2FCBoxHead`, :class:`Shared4Conv1FCBoxHead`): RoI features to class
  logits and class-specific deltas;
- :class:`RoIHead`: the R-CNN stage (sampling, box loss, test-time post-processing).
"""

from .box_head import Shared2FCBoxHead, Shared4Conv1FCBoxHead, select_class_deltas
from .roi_extractor import MultiLevelRoIExtractor, map_rois_to_levels
from .roi_head import RoIHead

__all__ = [
    "MultiLevelRoIExtractor", "RoIHead", "Shared2FCBoxHead", "Shared4Conv1FCBoxHead", "map_rois_to_levels",
    "select_class_deltas",
]
