"""RoIAlign: typed wrapper and ``nn.Module`` around ``torch.ops.libra.roi_align``.

Autocast: the wrapper runs the op in float32 with autocast disabled and casts the
result back to the input's dtype. Bilinear sampling of many points is a reduction
where half precision loses accuracy, and doing it in the wrapper keeps one code path
for the compiled kernels and the pure-PyTorch fallback (under ``torch.compile`` too).
Calling ``torch.ops.libra.roi_align`` directly under autocast simply runs in the
dtype it is given (half/bfloat16 kernels accumulate in float32).

Drop-in for ``torchvision.ops.roi_align`` / ``RoIAlign`` (same arguments and results),
with these differences:

- Bad arguments (shapes, devices, output size) raise ``ValueError`` from the wrapper,
  where torchvision raises ``RuntimeError``; ``torch.ops.libra.roi_align`` called
  directly raises ``RuntimeError`` like torchvision's op.
- Defaults are Libra R-CNN's: ``sampling_ratio=0``, ``aligned=True`` (torchvision:
  -1, False). Any ``sampling_ratio <= 0`` is adaptive, so 0 and -1 are the same.
- The adaptive grid is capped at 64 samples per bin side (``MAX_ADAPTIVE_SAMPLING_GRID``):
  ``min(ceil(roi_size / output_size), 64)``, so no RoI can cost unbounded time or memory
  (torchvision has none). The cap never changes the
  result of a RoI inside a 1333x800 image at FPN strides 4..64 with 7x7 bins (at most
  ceil(1333 / 4 / 7) = 48 samples); beyond it, a capped axis takes 64 samples per bin,
  as ``sampling_ratio=64`` would. A positive ``sampling_ratio`` is used as given.
- RoIs with a NaN/inf coordinate or an out-of-range batch index give zeros (and a zero
  gradient).

Like torchvision's, :func:`roi_align` is a leaf of ``torch.fx`` symbolic tracing (``torch.fx.wrap``:
``RoIAlign`` and any module that calls ``libra.ops.roi_align`` trace to one ``call_function``
node), and ``roi_align`` / ``RoIAlign`` compile with ``torch.jit.script``. The scripted form calls
``torch.ops.libra.roi_align`` directly (it needs ``libra._C``: no pure-PyTorch fallback, and no
float32 up-cast under autocast) after the same shape checks.
"""
import torch
import torch.fx
from torch import Tensor, nn

from libra.ops._extension import use_extension
from libra.ops.roi_align_reference import roi_align_reference


def boxes_list_to_rois(boxes: list[Tensor]) -> Tensor:
    """Concatenate per-image boxes ``[Ki, 4]`` into ``[sum Ki, 5]`` rois (batch index first)."""
    if len(boxes) == 0:
        raise ValueError("roi_align got an empty list of boxes; pass one [Ki, 4] tensor per image.")
    rows = []
    for image_index, image_boxes in enumerate(boxes):
        if image_boxes.dim() != 2 or image_boxes.shape[1] != 4:
            raise ValueError(
                f"roi_align: boxes[{image_index}] has shape {tuple(image_boxes.shape)}; expected [Ki, 4] (x1, y1, x2, y2)."
            )
        batch_column = torch.full_like(image_boxes[:, :1], image_index)
        rows.append(torch.cat([batch_column, image_boxes], dim=1))
    return torch.cat(rows, dim=0)


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    if len(size) != 2:
        raise ValueError(f"output_size must be an int or a pair (height, width), got {size!r}.")
    return int(size[0]), int(size[1])


@torch.fx.wrap
def roi_align(
    input: Tensor,
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    aligned: bool = True,
) -> Tensor:
    """Pool a fixed-size feature for every RoI by averaging bilinear samples per bin.

    Args:
        input: [N, C, H, W] feature map (float32/float64/float16/bfloat16).
        rois: [K, 5] rows ``(batch_index, x1, y1, x2, y2)`` in image coordinates, or a
            list of N per-image ``[Ki, 4]`` boxes.
        output_size: ``oh`` or ``(oh, ow)`` bins per RoI (7 in Libra R-CNN).
        spatial_scale: multiplies box coordinates to reach the feature map (1 / stride).
        sampling_ratio: samples per bin along each axis; <= 0 (0, or torchvision's -1)
            = adaptive ``min(ceil(roi_size / output_size), 64)``.
        aligned: half-pixel alignment (``roi * scale - 0.5``, no minimum RoI size);
            False = legacy Mask R-CNN behaviour (RoI size clamped to >= 1).

    Returns:
        [K, C, oh, ow] in ``input.dtype``.

    Raises:
        ValueError: for a bad ``input``, ``rois`` or ``output_size`` (torchvision raises
            RuntimeError).
    """
    if not torch.jit.is_scripting():
        return _roi_align_eager(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    # TorchScript (the branch above is left out when scripting): the same checks with constant
    # messages, then the compiled op.
    if input.dim() != 4:
        raise ValueError("roi_align: input must be a [N, C, H, W] tensor")
    if isinstance(rois, list):
        if len(rois) == 0:
            raise ValueError("roi_align got an empty list of boxes; pass one [Ki, 4] tensor per image")
        rows: list[Tensor] = []
        for image_index, image_boxes in enumerate(rois):
            if image_boxes.dim() != 2 or image_boxes.shape[1] != 4:
                raise ValueError("roi_align: every boxes[i] must be a [Ki, 4] tensor (x1, y1, x2, y2)")
            rows.append(torch.cat([torch.full_like(image_boxes[:, :1], image_index), image_boxes], dim=1))
        rois = torch.cat(rows, dim=0)
    if rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError("roi_align: rois must be a [K, 5] tensor (batch_index, x1, y1, x2, y2) or a list of [Ki, 4] boxes")
    if rois.device != input.device:
        raise ValueError("roi_align: rois and input must be on one device")
    if not rois.is_floating_point():
        rois = rois.to(input.dtype)
    if isinstance(output_size, int):
        pooled_height, pooled_width = output_size, output_size
    else:
        pooled_height, pooled_width = output_size[0], output_size[1]
    if pooled_height <= 0 or pooled_width <= 0:
        raise ValueError("roi_align: output_size must be positive")
    return torch.ops.libra.roi_align(
        input, rois, float(spatial_scale), pooled_height, pooled_width, sampling_ratio, aligned
    )


@torch.jit.unused
def _roi_align_eager(
    input: Tensor,
    rois: Tensor | list[Tensor],
    output_size: int | tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
) -> Tensor:
    """:func:`roi_align` outside TorchScript: checks with the offending values in the message,
    autocast, and the pure-PyTorch fallback without ``libra._C``."""
    if not isinstance(input, Tensor) or input.dim() != 4:
        raise ValueError(f"roi_align: input must be a [N, C, H, W] tensor, got {getattr(input, 'shape', type(input))}.")
    if isinstance(rois, (list, tuple)):
        rois = boxes_list_to_rois(list(rois))
    if not isinstance(rois, Tensor) or rois.dim() != 2 or rois.shape[1] != 5:
        raise ValueError(
            f"roi_align: rois must be a [K, 5] tensor (batch_index, x1, y1, x2, y2) or a list of [Ki, 4] boxes, "
            f"got {getattr(rois, 'shape', type(rois))}."
        )
    if rois.device != input.device:
        raise ValueError(f"roi_align: rois are on {rois.device} but input is on {input.device}; move them to one device.")
    if not rois.is_floating_point():
        rois = rois.to(input.dtype)
    pooled_height, pooled_width = _pair(output_size)
    if pooled_height <= 0 or pooled_width <= 0:
        raise ValueError(f"roi_align: output_size must be positive, got {output_size!r}.")

    device_type = input.device.type
    if torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type, enabled=False):
            output = _roi_align(input.float(), rois.float(), spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)
        return output.to(input.dtype)
    return _roi_align(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


def _roi_align(
    input: Tensor, rois: Tensor, spatial_scale: float, pooled_height: int, pooled_width: int, sampling_ratio: int, aligned: bool
) -> Tensor:
    if use_extension():
        return torch.ops.libra.roi_align(
            input, rois, float(spatial_scale), pooled_height, pooled_width, int(sampling_ratio), bool(aligned)
        )
    return roi_align_reference(input, rois, spatial_scale, pooled_height, pooled_width, sampling_ratio, aligned)


class RoIAlign(nn.Module):
    """Module form of :func:`roi_align` (no parameters)."""

    def __init__(
        self, output_size: int | tuple[int, int], spatial_scale: float = 1.0, sampling_ratio: int = 0, aligned: bool = True
    ) -> None:
        super().__init__()
        # Typed attributes: torch.jit.script infers a module's attribute types from their values.
        self.output_size = _pair(output_size)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.aligned = bool(aligned)

    def forward(self, input: Tensor, rois: Tensor | list[Tensor]) -> Tensor:
        """input [N, C, H, W], rois [K, 5] or list of [Ki, 4] -> [K, C, oh, ow]."""
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )
