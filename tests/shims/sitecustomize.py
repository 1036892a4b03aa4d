"""The test environment's one shim, for every process the tests start (tests/conftest.py puts
this directory on PYTHONPATH): torchvision importable beside the CPU build of torch.

PyPI's torchvision 0.28.0 (the release for torch 2.13.0, a test extra for ResNet-18) is built
against CUDA torch. Beside the CPU build its C++ operators (nms, roi_align, ...) cannot load,
and `import torchvision` stops where it registers fake kernels for two of them, `nms` and `qnms`;
transformers imports torchvision too. The models the tests build use none of them. So the first
time torchvision is imported, and only where torch is the CPU build and torchvision a CUDA one,
those two schemas are declared first and the import goes through. Until then nothing is imported
(torch takes 3 s; most processes never need torchvision)."""
import importlib.abc
import sys


class _DeclareTorchvisionOps(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)  # once; and the lookups below must not come back here
        import importlib.util
        from pathlib import Path

        import torch

        spec = importlib.util.find_spec("torchvision")
        version = Path(spec.origin).with_name("version.py").read_text() if spec else ""
        declared = hasattr(torch.ops, "torchvision") and hasattr(torch.ops.torchvision, "nms")
        if torch.version.cuda is None and "+cu" in version and not declared:
            lib = torch.library.Library("torchvision", "DEF")
            for op in ("nms", "qnms"):
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
            _DeclareTorchvisionOps.lib = lib  # the library lives as long as the process
        return None  # the normal import goes on


sys.meta_path.insert(0, _DeclareTorchvisionOps())
