"""RoI heads: everything that works on pooled regions of interest.

- :class:`MultiLevelRoIExtractor`: RoIAlign of each RoI on the pyramid level of its size;
- box heads (:class:`Shared2FCBoxHead`, :class:`Shared4Conv1FCBoxHead`): RoI features to class
  logits and class-specific deltas;
- :class:`RoIHead`: the R-CNN stage (sampling, box loss, test-time post-processing);
- :class:`FCNMaskHead` and :class:`MaskRoIHead`: Mask R-CNN's mask head and the R-CNN stage with
  a mask branch fed by the same sampled RoIs.
"""

from .box_head import Shared2FCBoxHead, Shared4Conv1FCBoxHead, select_class_deltas
from .roi_extractor import MultiLevelRoIExtractor, map_rois_to_levels
from .mask_head import FCNMaskHead, mask_loss, mask_probs_for_labels, mask_roi_extractor
from .mask_roi_head import MaskRoIHead
from .roi_head import RoIHead

__all__ = [
    "FCNMaskHead", "MaskRoIHead", "MultiLevelRoIExtractor", "RoIHead", "Shared2FCBoxHead", "Shared4Conv1FCBoxHead",
    "map_rois_to_levels", "mask_loss", "mask_probs_for_labels", "mask_roi_extractor", "select_class_deltas",
]
