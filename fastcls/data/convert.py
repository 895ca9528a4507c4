"""Moved to fastcls.tools.convert; `python -m fastcls.data.convert` still runs it."""
import runpy

if __name__ == "__main__":
    runpy.run_module("fastcls.tools.convert", run_name="__main__", alter_sys=True)
