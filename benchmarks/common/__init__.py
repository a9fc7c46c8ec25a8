"""What the benchmarks share: the model builder (:mod:`.models`), the arguments (:mod:`.args`)
and the results helpers (:mod:`.results`: machine, versions, peak memory, timing).
"""
