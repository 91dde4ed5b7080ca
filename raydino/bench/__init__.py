"""Benchmarks: python -m raydino.bench {aug,train,data,gpu,all}."""
