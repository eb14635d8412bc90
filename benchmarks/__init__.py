"""Experiments and measurements that print numbers; benchmarks/README.md says what each module is for, its docstring
how to run it."""
