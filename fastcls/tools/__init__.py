"""Command-line tools around the data (not imported by training): `python -m fastcls.tools.X`
for X in convert (to .beton or tar shards), check (find undecodable images), demo (write the
demo dataset), shard_index (index shards written elsewhere)."""
