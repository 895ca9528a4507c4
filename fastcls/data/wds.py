"""`python -m fastcls.data.wds index SHARDS OUT` moved to `python -m fastcls.tools.shard_index`
(the shard format is fastcls.data.shards); the old spelling still runs it."""
import runpy

if __name__ == "__main__":
    runpy.run_module("fastcls.tools.shard_index", run_name="__main__", alter_sys=True)
