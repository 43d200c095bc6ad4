"""One module per pipeline stage: its params model, the artifacts it reads and writes, and `run`.

Each stage module ends with `STAGES = (Stage(...), ...)` (see stages/contract.py); pipeline/
discovers them. Shared pieces sit below the stage modules: contract (the declarations), common
(atomic outputs, small-file I/O, figures, progress), artifacts (paths and validated readers of
what stages hand each other), gates (the go/no-go mechanism). No Prefect import anywhere here.
"""
