"""fastcls: a data-pipeline-centric PyTorch trainer for image classification."""
import os as _os
import sys as _sys

__version__ = "0.1.0"

_HERE = _os.path.dirname(_os.path.abspath(__file__))
_KERNELS = _os.path.join(_os.path.dirname(_HERE), "kernels")


class _CheckoutKernels:
    """`fastcls.kernels` from a source checkout used without installing (PYTHONPATH=$PWD, as
    on the lent GPU machines, or a legacy `setup.py develop` link): it is the top-level
    kernels/ folder, which setup.py maps into the package only at install (package_dir).
    Written by hand because importlib has no other way to alias a folder as a subpackage;
    it sits last on sys.meta_path, so an install's own mapping always wins."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name != "fastcls.kernels":
            return None
        import importlib.util
        return importlib.util.spec_from_file_location(
            name, _os.path.join(_KERNELS, "__init__.py"), submodule_search_locations=[_KERNELS])


if not _os.path.isdir(_os.path.join(_HERE, "kernels")) and \
        _os.path.isfile(_os.path.join(_KERNELS, "__init__.py")):
    _sys.meta_path.append(_CheckoutKernels)
