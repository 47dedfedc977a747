"""Loads the compiled extension ``libra._C`` once and says whether it is there.

Importing ``libra._C`` runs the ``TORCH_LIBRARY(libra, ...)`` registrations, after
which the kernels are reachable as ``torch.ops.libra.*``. When the import fails
(the package was not built), the wrappers in ``libra.ops`` fall back to the
pure-PyTorch references and emit ONE warning explaining how to build.
"""
import warnings

import torch  # noqa: F401  (loads libc10/libtorch, which libra._C links against)

EXTENSION_ERROR: str | None = None
try:
    from libra import _C  # noqa: F401  (import registers the ops)

    EXTENSION_AVAILABLE = True
except ImportError as error:  # not built, or built against another torch
    EXTENSION_AVAILABLE = False
    EXTENSION_ERROR = str(error)

_warned = False


def use_extension(stacklevel: int = 4) -> bool:
    """True when ``torch.ops.libra`` kernels can be used; warns once when they cannot.

    ``stacklevel`` points the warning at the user's call (wrapper depth + 1).
    """
    global _warned
    if not EXTENSION_AVAILABLE and not _warned:
        _warned = True
        warnings.warn(
            "libra._C is not built ({}); libra.ops uses the slower pure-PyTorch reference ops. "
            "Build it with `pip install --no-build-isolation -e .`.".format(EXTENSION_ERROR),
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    return EXTENSION_AVAILABLE


_warned_stale: set[str] = set()


def _registered_ops(names: tuple[str, ...]) -> frozenset[str]:
    found = set()
    for name in names:
        try:
            torch._C._dispatch_find_schema_or_throw(f"libra::{name}", "")
        except RuntimeError:
            continue
        found.add(name)
    return frozenset(found)


# The ops the Python side knows, and those the loaded libra._C registers: an extension built
# from an older checkout loads but lacks the newer ops (e.g. deform_conv2d). Looked up once
# here, so that the check costs nothing per call and traces under torch.compile.
KNOWN_OPS = ("roi_align", "_roi_align_backward", "nms", "batched_nms", "deform_conv2d", "_deform_conv2d_backward")
REGISTERED_OPS = _registered_ops(KNOWN_OPS) if EXTENSION_AVAILABLE else frozenset()


def has_op(name: str) -> bool:
    """True when the loaded ``libra._C`` registers ``libra::<name>`` (one of ``KNOWN_OPS``)."""
    return name in REGISTERED_OPS


def use_extension_op(name: str, stacklevel: int = 4) -> bool:
    """Like :func:`use_extension` for one op: also False (with one warning per op) when the
    built ``libra._C`` predates ``libra::<name>``."""
    if not use_extension(stacklevel + 1):
        return False
    if has_op(name):
        return True
    if name not in _warned_stale:
        _warned_stale.add(name)
        warnings.warn(
            f"libra._C has no libra::{name} (it was built from an older checkout); libra.ops uses the slower "
            "pure-PyTorch reference for it. Rebuild with `pip install --no-build-isolation -e .`.",
            RuntimeWarning,
            stacklevel=stacklevel,
        )
    return False
