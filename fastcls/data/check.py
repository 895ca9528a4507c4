"""Moved to fastcls.tools.check; `python -m fastcls.data.check` still runs it."""
import runpy

if __name__ == "__main__":
    runpy.run_module("fastcls.tools.check", run_name="__main__", alter_sys=True)
