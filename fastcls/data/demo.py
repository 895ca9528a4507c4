"""Moved to fastcls.tools.demo; `python -m fastcls.data.demo` still runs it."""
import runpy

if __name__ == "__main__":
    runpy.run_module("fastcls.tools.demo", run_name="__main__", alter_sys=True)
